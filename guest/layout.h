/*
 * labkit guest memory layout, shared by guest.c and mirrored in labkit/backends/qemu_guest.py
 * (keep both in step; README.md documents it). All fields little-endian; C side is x86-64.
 */
#ifndef LABKIT_GUEST_LAYOUT_H
#define LABKIT_GUEST_LAYOUT_H

#define PAGE_SHIFT 12
#define PAGE_SIZE 4096
#define PAGE_WORDS (PAGE_SIZE / 4)

/* Pages of usable RAM from 2 MiB up carry the pattern (below 2 MiB: BIOS, kernel, heartbeat). */
#define FIRST_PFN 0x200ULL
#define MAP_LIMIT (64ULL << 30) /* boot.S identity-maps the first 64 GiB */

/* Page pattern: u64 pfn, u32 generation, then u32 word[i] = seed ^ (i * PATTERN_MUL_IDX) for i >= 3,
 * seed = pfn * PATTERN_MUL_PFN + generation * PATTERN_MUL_GEN (all mod 2^32). */
#define PAGE_HEADER_WORDS 3
#define PATTERN_MUL_PFN 0x9E3779B1u
#define PATTERN_MUL_GEN 0x85EBCA77u
#define PATTERN_MUL_IDX 0x01000193u

/* Heartbeat page: fixed guest-physical address just below 2 MiB, above the kernel image. */
#define HEARTBEAT_ADDR 0x1FF000ULL
#define HEARTBEAT_MAGIC 0x42484B4Cu /* "LKHB" */
#define HEARTBEAT_VERSION 2
#define HEARTBEAT_RANGES 4
#define HEARTBEAT_GAP_SLOTS 16

#ifndef __ASSEMBLER__
struct heartbeat_range {
    unsigned long long start_pfn; /* first patterned page */
    unsigned long long end_pfn;   /* one past the last */
};

struct heartbeat_gap {
    unsigned long long end_tsc; /* TSC when the gap ended */
    unsigned long long gap_tsc; /* TSC cycles between two page writes */
    unsigned long long seq;     /* heartbeat seq at the end of the gap */
};

struct heartbeat {
    unsigned int magic;                 /* 0x000 "LKHB" */
    unsigned int version;               /* 0x004 */
    unsigned int lock;                  /* 0x008 seqlock: odd while the guest updates this page */
    unsigned int tsc_khz;               /* 0x00c TSC frequency measured against the PIT, 0 if unknown */
    unsigned long long seq;             /* 0x010 pages written since boot */
    unsigned long long tsc;             /* 0x018 TSC at the last page write */
    unsigned long long boot_tsc;        /* 0x020 TSC at start */
    unsigned long long max_gap_tsc;     /* 0x028 largest gap between two page writes (pacing excluded) */
    unsigned long long max_gap_seq;     /* 0x030 seq when it ended */
    unsigned long long max_gap_end_tsc; /* 0x038 TSC when it ended */
    unsigned long long dirty_rate;      /* 0x040 bytes/s from the command line, 0 = unpaced */
    unsigned int generation;            /* 0x048 pass being written (1, 2, ...) */
    unsigned int passes;                /* 0x04c passes completed */
    unsigned long long cur_pfn;         /* 0x050 page being written now (may be half-written) */
    unsigned int mem_upper_kib;         /* 0x058 Multiboot mem_upper */
    unsigned int gap_count;             /* 0x05c gaps of >= 1 ms seen; the last 16 are in gaps[] */
    unsigned int nr_ranges;             /* 0x060 patterned RAM ranges, in address order */
    unsigned int reserved0;             /* 0x064 */
    struct heartbeat_range ranges[HEARTBEAT_RANGES];  /* 0x068 */
    struct heartbeat_gap gaps[HEARTBEAT_GAP_SLOTS];   /* 0x0a8 ring, slot = gap_count % 16 */
    char cmdline[256];                  /* 0x228 Multiboot command line (kernel path + -append) */
    unsigned long long progress_bytes;  /* 0x328 bytes written since boot: one aligned store per page,
                                         * outside the seqlock, so a host sampling at kHz reads it alone */
};

_Static_assert(__builtin_offsetof(struct heartbeat, seq) == 0x10, "layout");
_Static_assert(__builtin_offsetof(struct heartbeat, dirty_rate) == 0x40, "layout");
_Static_assert(__builtin_offsetof(struct heartbeat, cur_pfn) == 0x50, "layout");
_Static_assert(__builtin_offsetof(struct heartbeat, ranges) == 0x68, "layout");
_Static_assert(__builtin_offsetof(struct heartbeat, gaps) == 0xa8, "layout");
_Static_assert(__builtin_offsetof(struct heartbeat, cmdline) == 0x228, "layout");
_Static_assert(__builtin_offsetof(struct heartbeat, progress_bytes) == 0x328, "layout");
_Static_assert(sizeof(struct heartbeat) == 0x330, "layout");
#endif

#endif
