/* An AVX2-only CPU for one process: LD_PRELOAD this library and CPUID stops reporting AVX-512 and VNNI.
 *
 * Engines such as ONNX Runtime (MLAS), TensorFlow Lite / Larq Compute Engine (ruy, XNNPACK) and oneDNN pick
 * their kernels from the CPUID instruction and have no switch to cap them, so on an AVX-512 machine they
 * cannot be timed as they would run on an AVX2-only one. Linux can make CPUID fault in user space on CPUs
 * with CPUID faulting (`cpuid_fault` in /proc/cpuinfo; arch_prctl(ARCH_SET_CPUID, 0)): the library turns
 * that on when it loads and answers each faulting CPUID from a SIGSEGV handler with the real result, less
 * the AVX-512 feature bits (leaf 7: AVX512F/DQ/IFMA/PF/ER/CD/BW/VL, VBMI/VBMI2/VNNI/BITALG/VPOPCNTDQ,
 * 4VNNIW/4FMAPS/VP2INTERSECT/FP16; leaf 7.1: AVX-VNNI, AVX512_BF16). AVX2, FMA and POPCNT stay.
 *
 * The setting is per thread and inherited by the threads a process starts (execve resets it). A program
 * that later installs its own SIGSEGV handler (Python's faulthandler, a crash reporter) gets it chained
 * behind this one through the sigaction() wrapper below, so CPUID keeps working and real faults still
 * reach it. Build: cc -O2 -shared -fPIC -o cpuid_without_avx512.so cpuid_without_avx512.c -ldl
 * (benchmarks/_common.py's without_avx512_env() builds it and checks that it works).
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);

static sigaction_fn real_sigaction;
static struct sigaction program_handler; /* what the program asked for SIGSEGV: called for real faults */
static int installed;

static int cpuid_faults(int on) { return (int)syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1); }

static void mask_avx512(unsigned leaf, unsigned sub, unsigned *a, unsigned *b, unsigned *c, unsigned *d) {
    if (leaf == 7 && sub == 0) {
        *b &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) |
                (1u << 31));
        *c &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        *d &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 23));
    } else if (leaf == 7 && sub == 1) {
        *a &= ~((1u << 4) | (1u << 5));
    }
}

static void on_segv(int sig, siginfo_t *info, void *context) {
    greg_t *regs = ((ucontext_t *)context)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)regs[REG_RIP];
    if (ip[0] == 0x0f && ip[1] == 0xa2) { /* CPUID */
        unsigned leaf = (unsigned)regs[REG_RAX], sub = (unsigned)regs[REG_RCX], a, b, c, d;
        cpuid_faults(0);
        __cpuid_count(leaf, sub, a, b, c, d);
        cpuid_faults(1);
        mask_avx512(leaf, sub, &a, &b, &c, &d);
        regs[REG_RAX] = a;
        regs[REG_RBX] = b;
        regs[REG_RCX] = c;
        regs[REG_RDX] = d;
        regs[REG_RIP] += 2;
        return;
    }
    if (program_handler.sa_flags & SA_SIGINFO) {
        program_handler.sa_sigaction(sig, info, context);
    } else if (program_handler.sa_handler == SIG_IGN) {
        return;
    } else if (program_handler.sa_handler != SIG_DFL) {
        program_handler.sa_handler(sig);
    } else {
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        real_sigaction(SIGSEGV, &dfl, NULL); /* the faulting instruction runs again and ends the process */
    }
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction) real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    if (sig != SIGSEGV || !installed) return real_sigaction(sig, act, old);
    if (old) *old = program_handler;
    if (act) program_handler = *act;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    act.sa_flags = SA_RESTART;
    if (sigaction(sig, &act, &old) != 0) return SIG_ERR;
    return old.sa_handler;
}

__attribute__((constructor)) static void start_masking(void) {
    struct sigaction act;
    if (!real_sigaction) real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    memset(&act, 0, sizeof act);
    act.sa_sigaction = on_segv;
    act.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&act.sa_mask);
    if (real_sigaction(SIGSEGV, &act, &program_handler) != 0) return;
    if (cpuid_faults(1) != 0) { /* no CPUID faulting here: leave everything as it was */
        real_sigaction(SIGSEGV, &program_handler, NULL);
        return;
    }
    installed = 1;
}
