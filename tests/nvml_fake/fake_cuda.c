/* A fake libcuda.so.1 for tests: the CUDA driver calls scripts/gpu-check's memory holder makes.
 *
 * Build: gcc -shared -fPIC -o DIR/libcuda.so.1 fake_cuda.c
 * Allocating memory makes the calling process show up in the fake NVML, as on a real driver:
 * cuMemAlloc_v2 appends "process gpu=G pid=PID used_mib=N" to $FAKE_NVML_CONFIG, N being the
 * allocation plus a CUDA context's own memory (FAKE_CUDA_CONTEXT_MIB, default 300), G the
 * device the context was made on. $FAKE_CUDA_FAIL names one function that answers
 * CUDA_ERROR_OUT_OF_MEMORY (2) instead, for the failure paths. Return codes and names follow
 * the CUDA driver API reference (docs.nvidia.com/cuda/cuda-driver-api).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef unsigned long long CUdeviceptr;

#define CUDA_SUCCESS 0
#define CUDA_ERROR_INVALID_VALUE 1
#define CUDA_ERROR_OUT_OF_MEMORY 2
#define CUDA_ERROR_NOT_INITIALIZED 3
#define CUDA_ERROR_INVALID_DEVICE 101
#define CUDA_ERROR_INVALID_CONTEXT 201

static int initialised;
static int current = -1; /* the device of the current context, or -1 */
static int context_token;
static unsigned long long next_pointer = 0x7f0000000000ull;

static CUresult refused(const char *function) {
    const char *fail = getenv("FAKE_CUDA_FAIL");
    return fail != NULL && strcmp(fail, function) == 0 ? CUDA_ERROR_OUT_OF_MEMORY : CUDA_SUCCESS;
}

CUresult cuInit(unsigned int flags) {
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    CUresult status = refused("cuInit");
    if (status == CUDA_SUCCESS) initialised = 1;
    return status;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (device == NULL) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal < 0 || ordinal > 15) return CUDA_ERROR_INVALID_DEVICE;
    *device = ordinal;
    return refused("cuDeviceGet");
}

CUresult cuDevicePrimaryCtxRetain(CUcontext *context, CUdevice device) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (context == NULL) return CUDA_ERROR_INVALID_VALUE;
    if (device < 0 || device > 15) return CUDA_ERROR_INVALID_DEVICE;
    CUresult status = refused("cuDevicePrimaryCtxRetain");
    if (status != CUDA_SUCCESS) return status;
    *context = (CUcontext)((char *)&context_token + device);
    return CUDA_SUCCESS;
}

CUresult cuCtxSetCurrent(CUcontext context) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (context == NULL) {
        current = -1;
        return CUDA_SUCCESS;
    }
    long device = (char *)context - (char *)&context_token;
    if (device < 0 || device > 15) return CUDA_ERROR_INVALID_CONTEXT;
    current = (int)device;
    return refused("cuCtxSetCurrent");
}

CUresult cuMemAlloc_v2(CUdeviceptr *pointer, size_t bytes) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (current < 0) return CUDA_ERROR_INVALID_CONTEXT;
    if (pointer == NULL || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    CUresult status = refused("cuMemAlloc_v2");
    if (status != CUDA_SUCCESS) return status;
    const char *path = getenv("FAKE_NVML_CONFIG");
    const char *context_mib = getenv("FAKE_CUDA_CONTEXT_MIB");
    FILE *file = path == NULL ? NULL : fopen(path, "a");
    if (file == NULL) return CUDA_ERROR_OUT_OF_MEMORY;
    fprintf(file, "process gpu=%d pid=%d used_mib=%llu\n", current, (int)getpid(),
            (unsigned long long)(bytes >> 20) + (context_mib ? strtoull(context_mib, NULL, 10)
                                                             : 300ull));
    fclose(file);
    *pointer = next_pointer;
    next_pointer += (bytes + 0xfffffull) & ~0xfffffull;
    return CUDA_SUCCESS;
}

CUresult cuGetErrorName(CUresult error, const char **name) {
    if (name == NULL) return CUDA_ERROR_INVALID_VALUE;
    switch (error) {
    case CUDA_SUCCESS: *name = "CUDA_SUCCESS"; break;
    case CUDA_ERROR_INVALID_VALUE: *name = "CUDA_ERROR_INVALID_VALUE"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: *name = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case CUDA_ERROR_NOT_INITIALIZED: *name = "CUDA_ERROR_NOT_INITIALIZED"; break;
    case CUDA_ERROR_INVALID_DEVICE: *name = "CUDA_ERROR_INVALID_DEVICE"; break;
    case CUDA_ERROR_INVALID_CONTEXT: *name = "CUDA_ERROR_INVALID_CONTEXT"; break;
    default: *name = NULL; return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}
