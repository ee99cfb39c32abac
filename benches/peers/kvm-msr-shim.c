/* LD_PRELOAD shim for QEMU on hosts whose KVM accepts only 0 for
 * MSR_IA32_ARCH_CAPABILITIES (0x10a), such as PVM: QEMU writes the host's
 * value there at start and aborts when KVM refuses it. This rewrites that
 * one value to 0 in every KVM_SET_MSRS; nothing else changes.
 * Built and used by `skvm bench` only when the host needs it. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <linux/kvm.h>
#include <stdarg.h>
#include <stdint.h>
#include <sys/ioctl.h>

#define MSR_IA32_ARCH_CAPABILITIES 0x10a

int ioctl(int fd, unsigned long request, ...)
{
    static int (*real_ioctl)(int, unsigned long, ...);
    va_list args;
    va_start(args, request);
    void *arg = va_arg(args, void *);
    va_end(args);
    if (!real_ioctl)
        real_ioctl = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");
    if (request == KVM_SET_MSRS && arg) {
        struct kvm_msrs *msrs = arg;
        for (uint32_t i = 0; i < msrs->nmsrs; i++)
            if (msrs->entries[i].index == MSR_IA32_ARCH_CAPABILITIES)
                msrs->entries[i].data = 0;
    }
    return real_ioctl(fd, request, arg);
}
