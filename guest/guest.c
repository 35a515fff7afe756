/*
 * labkit guest: a tiny 32-bit Multiboot kernel that keeps dirtying all of its RAM in a pattern a host
 * tool can check, and a heartbeat a host tool can read, so a migration can be judged from outside:
 * did every page arrive intact, and did the guest keep running afterwards?
 *
 * Layout (see README.md): pages from 2 MiB to the end of low RAM carry their page number and the
 * pass ("generation") that wrote them; the heartbeat page sits at 0x1FF000.
 * boot.S switches to long mode with the first 64 GiB identity-mapped, so C runs in x86-64 with
 * virtual == physical, interrupts off, one vCPU; no libc.
 */
#include "layout.h"

typedef unsigned int u32;
typedef unsigned long long u64;

struct multiboot_info {
    u32 flags;
    u32 mem_lower; /* KiB below 1 MiB (flags bit 0) */
    u32 mem_upper; /* KiB of contiguous RAM from 1 MiB (flags bit 0) */
    u32 boot_device;
    u32 cmdline; /* physical address of a NUL-terminated string (flags bit 2) */
    u32 mods_count, mods_addr;
    u32 syms[4];
    u32 mmap_length; /* BIOS E820 memory map (flags bit 6) */
    u32 mmap_addr;
};

struct multiboot_mmap_entry {
    u32 size; /* of the rest of this entry */
    u64 addr;
    u64 len;
    u32 type; /* 1 = usable RAM */
} __attribute__((packed));

#define barrier() __asm__ __volatile__("" ::: "memory")

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static inline void outb(unsigned short port, unsigned char v)
{
    __asm__ __volatile__("outb %0, %1" ::"a"(v), "Nd"(port));
}

static inline unsigned char inb(unsigned short port)
{
    unsigned char v;
    __asm__ __volatile__("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline void cpu_relax(void)
{
    __asm__ __volatile__("pause");
}

static inline u64 udiv64(u64 n, u64 d)
{
    return d ? n / d : ~0ULL;
}

/* ---- serial (COM1); with -nodefaults and no -serial there is no UART and these are harmless ---- */

static void serial_putc(char c)
{
    int tries = 100000;
    while (!(inb(0x3f8 + 5) & 0x20) && --tries)
        cpu_relax();
    outb(0x3f8, (unsigned char)c);
}

static void serial_puts(const char *s)
{
    while (*s) {
        if (*s == '\n')
            serial_putc('\r');
        serial_putc(*s++);
    }
}

static void serial_putu(u64 v)
{
    char buf[24];
    int i = 0;
    if (v == 0)
        buf[i++] = '0';
    while (v) {
        u64 q = udiv64(v, 10);
        buf[i++] = (char)('0' + (v - q * 10));
        v = q;
    }
    while (i)
        serial_putc(buf[--i]);
}

/* ---- TSC calibration against the PIT (channel 2, gated by port 0x61), about 10 ms ---- */

static u32 calibrate_tsc_khz(void)
{
    const u32 pit_ticks = 11932; /* 10 ms at 1.193182 MHz */
    unsigned char p61 = inb(0x61);
    u64 t0, t1;
    u32 spins = 0;

    outb(0x61, (unsigned char)((p61 & ~0x02) | 0x01)); /* gate on, speaker off */
    outb(0x43, 0xb0);                                   /* channel 2, lobyte/hibyte, mode 0 */
    outb(0x42, pit_ticks & 0xff);
    outb(0x42, pit_ticks >> 8);
    t0 = rdtsc();
    while (!(inb(0x61) & 0x20)) { /* OUT2 goes high at terminal count */
        if (++spins > 100000000)
            break;
    }
    t1 = rdtsc();
    outb(0x61, p61);
    if (t1 <= t0 || spins > 100000000)
        return 0;
    return (u32)udiv64(t1 - t0, 10); /* cycles per 10 ms / 10 = cycles per ms = kHz */
}

/* ---- command line: "dirty-rate=<size>[K|M|G]" in bytes per second, 0 = as fast as possible ---- */

static u64 parse_dirty_rate(const char *s)
{
    static const char key[] = "dirty-rate=";
    const char *start = s;
    for (; s && *s; s++) {
        int k = 0;
        if (s != start && s[-1] != ' ') /* match whole words only */
            continue;
        while (key[k] && s[k] == key[k])
            k++;
        if (key[k])
            continue;
        {
            const char *p = s + k;
            u64 v = 0;
            while (*p >= '0' && *p <= '9')
                v = v * 10 + (u64)(*p++ - '0');
            switch (*p) {
            case 'k': case 'K': v <<= 10; break;
            case 'm': case 'M': v <<= 20; break;
            case 'g': case 'G': v <<= 30; break;
            default: break;
            }
            return v;
        }
    }
    return 0;
}

/* ---- the page pattern (README.md "Page layout"); the host checks it with the same formula ---- */

static inline void write_page(u64 pfn, u32 gen)
{
    volatile u32 *w = (volatile u32 *)(pfn << PAGE_SHIFT);
    u32 seed = (u32)pfn * PATTERN_MUL_PFN + gen * PATTERN_MUL_GEN;
    u32 i;
    /* Body first, header last: a page caught half-written shows the old generation in its header. */
    for (i = PAGE_HEADER_WORDS; i < PAGE_WORDS; i++)
        w[i] = seed ^ (i * PATTERN_MUL_IDX);
    w[0] = (u32)pfn; /* page number, u64 little-endian */
    w[1] = (u32)(pfn >> 32);
    w[2] = gen;
}

/* find_ram_ranges: usable RAM from the Multiboot memory map, clipped to [2 MiB, 64 GiB), page-aligned;
 * falls back to mem_upper (contiguous RAM from 1 MiB) when there is no map. */
static u32 find_ram_ranges(const struct multiboot_info *mbi, struct heartbeat_range *out)
{
    u32 n = 0;
    if (mbi && (mbi->flags & (1u << 6))) {
        u64 p = mbi->mmap_addr, end = (u64)mbi->mmap_addr + mbi->mmap_length;
        while (p < end && n < HEARTBEAT_RANGES) {
            const struct multiboot_mmap_entry *e = (const struct multiboot_mmap_entry *)p;
            u64 lo = e->addr, hi = e->addr + e->len;
            if (e->type == 1) {
                if (lo < (FIRST_PFN << PAGE_SHIFT))
                    lo = FIRST_PFN << PAGE_SHIFT;
                if (hi > MAP_LIMIT)
                    hi = MAP_LIMIT;
                lo = (lo + PAGE_SIZE - 1) >> PAGE_SHIFT;
                hi >>= PAGE_SHIFT;
                if (lo < hi) {
                    out[n].start_pfn = lo;
                    out[n].end_pfn = hi;
                    n++;
                }
            }
            p += e->size + 4;
        }
    }
    if (n == 0 && mbi && (mbi->flags & 1)) {
        out[0].start_pfn = FIRST_PFN;
        out[0].end_pfn = (1024ULL + mbi->mem_upper) >> 2;
        n = out[0].end_pfn > FIRST_PFN;
    }
    return n;
}

/* ---- heartbeat: a seqlock so a host reading live RAM can tell a torn snapshot ---- */

static volatile struct heartbeat *const hb = (volatile struct heartbeat *)HEARTBEAT_ADDR;

static inline void hb_write_begin(void)
{
    hb->lock++; /* odd: update in progress */
    barrier();
}

static inline void hb_write_end(void)
{
    barrier();
    hb->lock++;
}

void guest_main(u32 magic, u32 mbi_addr)
{
    const struct multiboot_info *mbi = magic == 0x2BADB002 ? (const struct multiboot_info *)(u64)mbi_addr : 0;
    struct heartbeat_range ranges[HEARTBEAT_RANGES];
    u32 nr_ranges, r, gen, tsc_khz;
    u64 pfn, total_pages = 0, rate, cycles_per_page = 0, deadline, now, last, gap, seq = 0;
    const char *cmdline = 0;
    u32 i;

    if (mbi && (mbi->flags & 4))
        cmdline = (const char *)(u64)mbi->cmdline;
    nr_ranges = find_ram_ranges(mbi, ranges);
    rate = parse_dirty_rate(cmdline);
    tsc_khz = calibrate_tsc_khz();
    if (rate && tsc_khz) /* cycles/page = tsc_hz * PAGE_SIZE / rate */
        cycles_per_page = udiv64((u64)tsc_khz * 1000ULL * PAGE_SIZE, rate);

    for (i = 0; i < PAGE_SIZE / 4; i++)
        ((volatile u32 *)hb)[i] = 0;
    hb_write_begin();
    hb->magic = HEARTBEAT_MAGIC;
    hb->version = HEARTBEAT_VERSION;
    hb->mem_upper_kib = mbi && (mbi->flags & 1) ? mbi->mem_upper : 0;
    hb->tsc_khz = tsc_khz;
    hb->dirty_rate = rate;
    hb->boot_tsc = rdtsc();
    hb->nr_ranges = nr_ranges;
    for (r = 0; r < nr_ranges; r++) {
        hb->ranges[r].start_pfn = ranges[r].start_pfn;
        hb->ranges[r].end_pfn = ranges[r].end_pfn;
        total_pages += ranges[r].end_pfn - ranges[r].start_pfn;
    }
    for (i = 0; cmdline && cmdline[i] && i < sizeof(hb->cmdline) - 1; i++)
        hb->cmdline[i] = cmdline[i];
    hb_write_end();

    serial_puts("labkit guest: ");
    serial_putu((total_pages << PAGE_SHIFT) >> 20);
    serial_puts(" MiB patterned in ");
    serial_putu(nr_ranges);
    serial_puts(" range(s), tsc ");
    serial_putu(tsc_khz);
    serial_puts(" kHz, dirty-rate ");
    serial_putu(rate);
    serial_puts(" B/s\n");

    last = rdtsc();
    deadline = last;
    for (gen = 1;; gen++) {
        for (r = 0; r < nr_ranges; r++) {
            for (pfn = ranges[r].start_pfn; pfn < ranges[r].end_pfn; pfn++) {
                hb_write_begin(); /* together, so a snapshot says which pages hold which pass */
                hb->generation = gen;
                hb->cur_pfn = pfn;
                hb_write_end();

                write_page(pfn, gen);

                now = rdtsc();
                gap = now - last;
                last = now;
                seq++;
                hb_write_begin();
                hb->seq = seq;
                hb->tsc = now;
                if (gap > hb->max_gap_tsc) {
                    hb->max_gap_tsc = gap;
                    hb->max_gap_seq = seq;
                    hb->max_gap_end_tsc = now;
                }
                if (tsc_khz && gap >= (u64)tsc_khz) { /* a gap of 1 ms or more: keep the last few */
                    u32 slot = hb->gap_count % HEARTBEAT_GAP_SLOTS;
                    hb->gaps[slot].end_tsc = now;
                    hb->gaps[slot].gap_tsc = gap;
                    hb->gaps[slot].seq = seq;
                    hb->gap_count++;
                }
                hb_write_end();
                hb->progress_bytes = seq << PAGE_SHIFT; /* the host's progress sampler reads this word */

                if (cycles_per_page) {
                    u64 t = rdtsc(), prev, jump = 0;
                    deadline += cycles_per_page;
                    if (now > deadline + (u64)tsc_khz * 100) /* over 100 ms behind: rebase, no burst */
                        deadline = now;
                    while (t < deadline) { /* the wait beats too: a jump between two reads is a stall */
                        cpu_relax();
                        prev = t;
                        t = rdtsc();
                        if (t - prev > jump)
                            jump = t - prev;
                    }
                    last = t - jump; /* the pacing wait is not a pause, but a stall inside it is */
                }
            }
        }
        hb_write_begin();
        hb->passes = gen;
        hb_write_end();
    }
}
