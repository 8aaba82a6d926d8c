// A timeline of a CUDA program without Nsight Systems (not on the H200 machine): a CUPTI activity
// tracer loaded through CUDA's injection hook. It records every kernel (start, end, grid, graph id)
// and every CUDA runtime call (start, end on the host) on one clock, and writes them as text lines to
// $KVPOLAR_TRACE_OUT when the program exits:
//
//   K <start_ns> <end_ns> <graph_id> <grid x*y*z> <block x*y*z> <name, demangled>
//   R <start_ns> <end_ns> <thread id> <runtime call name>
//
// KVPOLAR_TRACE_KERNELS=0 records the runtime calls only: no kernel activity, so that the host's side of a
// step is timed without what tracing each kernel of a CUDA graph adds to cudaGraphLaunch.
//
// Built and used by scripts/trace_decode_gpu.py (g++ -shared against the machine's own CUPTI headers
// and libcupti), run as CUDA_INJECTION64_PATH=libcupti_trace.so KVPOLAR_TRACE_OUT=trace.txt PROGRAM.
// Kernels inside CUDA graphs are recorded one by one, with the programmatic-dependent-launch overlap
// the real run has; CUPTI adds a little time to each launch, the same for every KV cache type.

#include <cupti.h>
#include <cxxabi.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

namespace {

constexpr size_t kBufBytes = 8u << 20;

std::FILE * g_out = nullptr;
std::mutex  g_mu;
bool        g_done = false;

void fail(const char * what, CUptiResult r) {
    const char * msg = nullptr;
    cuptiGetResultString(r, &msg);
    std::fprintf(stderr, "cupti_trace: %s failed: %s\n", what, msg ? msg : "?");
}

#define TRY(call)                          \
    do {                                   \
        const CUptiResult r_ = (call);     \
        if (r_ != CUPTI_SUCCESS) {         \
            fail(#call, r_);               \
            return;                        \
        }                                  \
    } while (0)

std::string demangle(const char * name) {
    if (name == nullptr) {
        return "?";
    }
    int    status = 0;
    char * d      = abi::__cxa_demangle(name, nullptr, nullptr, &status);
    std::string s = status == 0 && d ? d : name;
    std::free(d);
    for (char & c : s) {
        if (c == '\n' || c == '\t') {
            c = ' ';
        }
    }
    return s;
}

void CUPTIAPI buffer_requested(uint8_t ** buffer, size_t * size, size_t * max_records) {
    *buffer      = static_cast<uint8_t *>(std::aligned_alloc(8, kBufBytes));
    *size        = *buffer ? kBufBytes : 0;
    *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t * buffer, size_t, size_t valid) {
    std::lock_guard<std::mutex> lock(g_mu);
    CUpti_Activity * rec = nullptr;
    while (g_out && cuptiActivityGetNextRecord(buffer, valid, &rec) == CUPTI_SUCCESS) {
        if (rec->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL || rec->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
            // fields of the oldest layouts that every newer CUpti_ActivityKernelN starts with
            const auto * k = reinterpret_cast<const CUpti_ActivityKernel9 *>(rec);
            std::fprintf(g_out, "K %llu %llu %u %lld %d %s\n", (unsigned long long) k->start,
                (unsigned long long) k->end, k->graphId, (long long) k->gridX * k->gridY * k->gridZ,
                k->blockX * k->blockY * k->blockZ, demangle(k->name).c_str());
        } else if (rec->kind == CUPTI_ACTIVITY_KIND_RUNTIME) {
            const auto * a    = reinterpret_cast<const CUpti_ActivityAPI *>(rec);
            const char * name = nullptr;
            cuptiGetCallbackName(CUPTI_CB_DOMAIN_RUNTIME_API, a->cbid, &name);
            std::fprintf(g_out, "R %llu %llu %u %s\n", (unsigned long long) a->start, (unsigned long long) a->end,
                a->threadId, name ? name : "?");
        }
    }
    std::free(buffer);
}

void finish() {
    if (g_done) {
        return;
    }
    g_done = true;
    cuptiActivityFlushAll(1);
    std::lock_guard<std::mutex> lock(g_mu);
    if (g_out) {
        std::fclose(g_out);
        g_out = nullptr;
    }
}

void start() {
    const char * path = std::getenv("KVPOLAR_TRACE_OUT");
    if (path == nullptr || *path == '\0') {
        std::fprintf(stderr, "cupti_trace: KVPOLAR_TRACE_OUT (the output file) is not set; nothing traced\n");
        return;
    }
    g_out = std::fopen(path, "w");
    if (g_out == nullptr) {
        std::fprintf(stderr, "cupti_trace: cannot write %s\n", path);
        return;
    }
    TRY(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed));
    const char * kernels = std::getenv("KVPOLAR_TRACE_KERNELS");
    if (kernels == nullptr || std::strcmp(kernels, "0") != 0) {
        TRY(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL));
    }
    TRY(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_RUNTIME));
    std::atexit(finish);
}

} // namespace

// called by the CUDA driver at cuInit when CUDA_INJECTION64_PATH names this library
extern "C" __attribute__((visibility("default"))) int InitializeInjection(void) {
    start();
    return 1;
}
