/*
 * Ring-0 part of the skvm test guest: PVH entry, long mode, GDT/TSS/IDT,
 * then iretq to ring 3 with IOPL=3 and interrupts off; and the #UD gate
 * ring 3 uses to sleep until a device interrupts (`halt=1`).
 *
 * Everything here runs at CPL0, which PVM hosts emulate instruction by
 * instruction (and where popcnt, cmpxchg16b, xsave/xrstor, int3, clac/stac,
 * fwait and ldmxcsr end the VM). So this file is straight-line code with
 * every table built by the assembler, and tests/guest_boot_code.rs checks
 * its disassembly.
 */

.set ISR_BASE, 0x101000          /* link.ld pins .boot.isr here */
.set TSS_ADDR, 0x102000          /* link.ld pins the TSS here; its bitmap needs 8 KiB */
.set KERNEL_CS, 0x08
.set KERNEL_DS, 0x10
.set USER_CS, 0x18 | 3
.set USER_DS, 0x20 | 3
.set TSS_SEL, 0x28
.set COM1, 0x3f8
.set DEBUG_EXIT_PORT, 0xf4
.set ACPI_SLEEP_PORT, 0x600
.set ACPI_S5, 0x34               /* SLP_TYP=5, SLP_EN */
.set I8042_CMD_PORT, 0x64
.set I8042_RESET, 0xfe
.set LAPIC_EOI, 0xfee000b0
.set IRQ_STUB, ISR_BASE + 0x800  /* every vector from 32 up */
.set UD_GATE, ISR_BASE + 0x840   /* #UD, and ring 3's way to sleep */
.set TICK_STUB, ISR_BASE + 0x880 /* the local APIC timer's vector */
.set TICK_VECTOR, 0x2f
.set IDT_VECTORS, 0x90           /* up to the local APIC's spurious vector, 0x8f */

/* ---------------------------------------------------------------- entry */
.section .boot.text, "ax"
.code32
.globl pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, start_info_ptr            /* PVH hands hvm_start_info in ebx */
    movl $pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x620, %eax                     /* PAE | OSFXSR | OSXMMEXCPT: SSE for ring 3 */
    movl %eax, %cr4
    movl $0xc0000080, %ecx               /* EFER.LME */
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    andl $0xfffffff3, %eax               /* clear EM and TS */
    orl $0x80000022, %eax                /* PG | NE | MP */
    movl %eax, %cr0
    lgdt gdt_ptr
    ljmp $KERNEL_CS, $start64

.code64
start64:
    movw $KERNEL_DS, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movq $kernel_stack_top, %rsp
    lidt idt_ptr
    movw $TSS_SEL, %ax
    ltr %ax
    pushq $USER_DS                       /* ss */
    pushq $user_stack_top                /* rsp */
    pushq $0x3002                        /* rflags: IOPL=3, IF=0 */
    pushq $USER_CS                       /* cs */
    pushq $ring3_entry                   /* rip */
    iretq

/* ------------------------------------------------------ exception stubs */
/* A fault means the guest is broken: report vector, error code and RIP on
 * COM1, then exit with status 0xe0 | vector. */
.section .boot.isr, "ax"
.globl isr_stubs
isr_stubs:
.set vec, 0
.rept 32
    .balign 16
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
.endr

    .balign 16
isr_common:
    movw $COM1, %dx
    leaq fault_msg(%rip), %rsi
    call puts0
    movq (%rsp), %rax                    /* vector */
    call puthex64
    leaq fault_err(%rip), %rsi
    call puts0
    movq 8(%rsp), %rax                   /* error code */
    call puthex64
    leaq fault_rip(%rip), %rsi
    call puts0
    movq 16(%rsp), %rax                  /* faulting rip */
    call puthex64
    leaq fault_end(%rip), %rsi
    call puts0
    movq (%rsp), %rax
    andl $0x1f, %eax
    orl $0xe0, %eax
    outb %al, $DEBUG_EXIT_PORT
    /* Under VMMs without the debug-exit port: ACPI S5, then i8042 reset. */
    movw $ACPI_SLEEP_PORT, %dx
    movb $ACPI_S5, %al
    outb %al, %dx
    movb $I8042_RESET, %al
    outb %al, $I8042_CMD_PORT
1:  hlt
    jmp 1b

/* puts0: write the NUL-terminated string at rsi to port dx. */
puts0:
    movb (%rsi), %al
    testb %al, %al
    jz 2f
    outb %al, %dx
    incq %rsi
    jmp puts0
2:  ret

/* puthex64: write rax as 16 hex digits to port dx. */
puthex64:
    movl $16, %ecx
3:  rolq $4, %rax
    movq %rax, %rbx
    andl $0xf, %ebx
    movb hex_digits(%rbx), %bl
    xchgb %al, %bl
    outb %al, %dx
    xchgb %al, %bl
    decl %ecx
    jnz 3b
    ret

hex_digits: .ascii "0123456789abcdef"
fault_msg:  .asciz "\r\nskvm-test-guest: exception 0x"
fault_err:  .asciz " error 0x"
fault_rip:  .asciz " rip 0x"
fault_end:  .asciz "\r\n"

/* A device interrupt only wakes the halt below: acknowledge it at the
 * local APIC and return. (The address does not fit a sign-extended imm32.) */
    .org 0x800
.globl irq_stub
irq_stub:
    pushq %rax
    movl $LAPIC_EOI, %eax
    movl $0, (%rax)
    popq %rax
    iretq

/* #UD: ring 3's way to sleep until an interrupt is a ud2 at halt_trap (PVM
 * hosts refuse `int n` from ring 3, and syscall does not reach CPL0);
 * any other #UD is a fault. Ring 3 runs with IF=0, so an interrupt that
 * came after its last look at the rings is still pending here: sti's
 * one-instruction shadow lets hlt start first, and that interrupt ends it
 * at once. iretq returns past the ud2 and restores IF=0. */
    .org 0x840
.globl ud_gate
ud_gate:
    pushq %rax
    movq $halt_trap, %rax
    cmpq %rax, 8(%rsp)
    popq %rax
    jne 6f
    addq $2, (%rsp)
    sti
    hlt
    iretq
6:  pushq $0
    pushq $6
    jmp isr_common

/* The local APIC's watchdog tick: like irq_stub, and it tells ring 3 that
 * this wake-up was the tick's, not a device's. */
    .org 0x880
.globl tick_stub
tick_stub:
    movl $1, tick_seen
    jmp irq_stub

/* --------------------------------------------------------------- tables */
.section .boot.data, "aw"
.globl tss
tss:
    .long 0
    .quad kernel_stack_top               /* rsp0: exceptions from ring 3 land here */
    .quad 0, 0                           /* rsp1, rsp2 */
    .quad 0                              /* reserved */
    .quad 0, 0, 0, 0, 0, 0, 0            /* ist1..ist7 */
    .quad 0                              /* reserved */
    .word 0                              /* reserved */
    .word 104                            /* I/O permission bitmap follows */
    /* Every port open to ring 3. IOPL=3 alone is not enough on PVM hosts,
     * which fault ring-3 port I/O unless the TSS bitmap allows it. */
    .fill 8192, 1, 0
    .byte 0xff                           /* bitmap terminator */
tss_end:

    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff             /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff             /* 0x10 kernel data */
    .quad 0x00affa000000ffff             /* 0x18 user code, 64-bit, DPL3 */
    .quad 0x00cff2000000ffff             /* 0x20 user data, DPL3 */
    .word tss_end - tss - 1              /* 0x28 TSS: limit */
    .word TSS_ADDR & 0xffff
    .byte (TSS_ADDR >> 16) & 0xff
    .byte 0x89                           /* present, 64-bit available TSS */
    .byte 0
    .byte (TSS_ADDR >> 24) & 0xff
    .long 0
    .long 0
gdt_end:

gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

    .balign 16
.globl idt
idt:
.set vec, 0
.rept IDT_VECTORS
    .if vec == 6
    .set target, UD_GATE
    .elseif vec == TICK_VECTOR
    .set target, TICK_STUB
    .elseif vec < 32
    .set target, ISR_BASE + vec * 16
    .else
    .set target, IRQ_STUB
    .endif
    .word target & 0xffff
    .word KERNEL_CS
    .byte 0
    .byte 0x8e                           /* present, DPL0, interrupt gate */
    .word target >> 16
    .long 0
    .long 0
    .set vec, vec + 1
.endr
idt_end:

idt_ptr:
    .word idt_end - idt - 1
    .quad idt

.globl start_info_ptr
start_info_ptr:
    .long 0

.globl tick_seen
tick_seen:
    .long 0

/* Identity map of the low 4 GiB with 2 MiB pages, user-accessible so that
 * ring 3 reaches RAM, the start info, ACPI tables and device MMIO. */
.section .boot.pagetables, "aw"
.globl pml4
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x0000 + 0x7
    .quad pd + 0x1000 + 0x7
    .quad pd + 0x2000 + 0x7
    .quad pd + 0x3000 + 0x7
    .fill 508, 8, 0
pd:
.set i, 0
.rept 2048
    .quad (i << 21) | 0x87               /* present, writable, user, 2 MiB */
    .set i, i + 1
.endr

/* --------------------------------------------------------------- ring 3 */
.section .text.ring3_entry, "ax"
.globl ring3_entry
ring3_entry:
    movq $__bss_start, %rdi              /* the stacks live outside .bss */
    movq $__bss_end, %rcx
    subq %rdi, %rcx
    xorl %eax, %eax
    rep stosb
    movl start_info_ptr, %edi
    call guest_main
4:  jmp 4b

.section .stacks, "aw", @nobits
    .balign 4096
kernel_stack:
    .skip 16384
kernel_stack_top:
user_stack:
    .skip 262144
user_stack_top:

.section .note.pvh, "a"
    .balign 4
    .long 4                              /* namesz */
    .long 4                              /* descsz */
    .long 18                             /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start32
