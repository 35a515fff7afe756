/*
 * labkit guest entry: the Multiboot (v1) header, a stack, identity-mapped page tables, and the switch
 * from 32-bit protected mode to 64-bit long mode before calling C.
 *
 * QEMU's `-kernel` loader scans the first 8 KiB of the file for the header, loads the (32-bit) ELF at
 * its linked address (1 MiB) and jumps to _start in 32-bit protected mode with paging off,
 * EAX = 0x2BADB002 and EBX = the physical address of the Multiboot information structure.
 *
 * Why long mode: some KVM hosts (nested, e.g. PVM) emulate a guest that runs with paging off one
 * instruction at a time (~5 ms per 4 KiB page); with paging on it runs at full speed. Long mode also
 * reaches RAM above 4 GiB. The first 64 GiB are identity-mapped with 2 MiB pages.
 */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003 /* bit 0: page-align modules, bit 1: give us memory information */
#define MAP_GIB 64           /* identity-mapped guest-physical range, in GiB */

        .section .multiboot, "a"
        .align 4
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)

        .section .bss
        .align 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pds:    .skip 4096 * MAP_GIB
        .align 16
stack_bottom:
        .skip 16384
stack_top:

        .section .rodata
        .align 8
gdt64:
        .quad 0                  /* null */
        .quad 0x00AF9A000000FFFF /* 0x08: 64-bit code, DPL 0 */
        .quad 0x00CF92000000FFFF /* 0x10: data, DPL 0 */
        .quad 0x00CFF2000000FFFF /* 0x18: data, DPL 3 */
        .quad 0x00AFFA000000FFFF /* 0x20: 64-bit code, DPL 3 */
gdt64_end:
gdt64_ptr:
        .word gdt64_end - gdt64 - 1
        .long gdt64

        .section .text
        .code32
        .globl _start
_start:
        cli
        cld
        movl $stack_top, %esp
        movl %eax, %edi /* Multiboot magic -> first C argument */
        movl %ebx, %esi /* Multiboot info   -> second C argument */

        /* PML4[0] -> PDPT; PDPT[i] -> pds + i*4 KiB; PD entries map 2 MiB pages 1:1. */
        movl $pdpt, %eax
        orl $0x7, %eax           /* present, writable, user */
        movl %eax, pml4

        xorl %ecx, %ecx
1:      movl %ecx, %eax
        shll $12, %eax
        addl $pds, %eax
        orl $0x7, %eax
        movl %eax, pdpt(, %ecx, 8)
        incl %ecx
        cmpl $MAP_GIB, %ecx
        jne 1b

        xorl %ecx, %ecx          /* ecx = 2 MiB page index */
2:      movl %ecx, %eax
        shll $21, %eax
        orl $0x87, %eax          /* present, writable, user, 2 MiB page */
        movl %eax, pds(, %ecx, 8)
        movl %ecx, %eax
        shrl $11, %eax           /* bits 32+ of the physical address */
        movl %eax, pds + 4(, %ecx, 8)
        incl %ecx
        cmpl $(MAP_GIB * 512), %ecx
        jne 2b

        movl %cr4, %eax
        orl $(1 << 5), %eax      /* PAE */
        movl %eax, %cr4
        movl $pml4, %eax
        movl %eax, %cr3
        movl $0xC0000080, %ecx   /* EFER */
        rdmsr
        orl $(1 << 8), %eax      /* LME */
        wrmsr
        movl %cr0, %eax
        orl $0x80000001, %eax    /* PG | PE */
        movl %eax, %cr0
        lgdt gdt64_ptr
        ljmp $0x08, $long_entry

        .code64
long_entry:
        movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movw %ax, %fs
        movw %ax, %gs
        movq $stack_top, %rsp
        /* Drop to ring 3 with IOPL 3 (port I/O still allowed) and interrupts off: iretq frame is
         * SS, RSP, RFLAGS, CS, RIP. Nothing here ever returns to ring 0 (no IDT/TSS needed). */
        pushq $0x1b
        pushq $stack_top
        pushq $0x3002
        pushq $0x23
        pushq $user_entry
        iretq
user_entry:
        movw $0x1b, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %fs
        movw %ax, %gs
        call guest_main
3:      pause                    /* hlt would fault in ring 3 */
        jmp 3b

        .section .note.GNU-stack, "", @progbits
