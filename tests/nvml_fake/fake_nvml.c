/* A fake libnvidia-ml.so.1 for tests: answers NVML calls from the file in $FAKE_NVML_CONFIG.
 *
 * Build: gcc -shared -fPIC -o DIR/libnvidia-ml.so.1 fake_nvml.c
 * Only the symbols appliance/gpu/nvml.py reaches through nvidia-ml-py are exported; the config
 * format is in README.md beside this file. -DFAKE_NVML_NO_V3 (and _NO_V2, _NO_V1) leave out
 * that version of the process-list calls, as an older driver does. Return codes and
 * buffer-size rules follow the NVML reference (docs.nvidia.com/deploy/nvml-api).
 */
#define _GNU_SOURCE /* fmemopen */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;

#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_NO_PERMISSION 4
#define NVML_ERROR_NOT_FOUND 6
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_DRIVER_NOT_LOADED 9
#define NVML_ERROR_ARGUMENT_VERSION_MISMATCH 25
#define NVML_ERROR_UNKNOWN 999

#define NVML_MEMORY_V2 0x02000028u
#define NOT_AVAILABLE_ULL 0xFFFFFFFFFFFFFFFFull
#define MIB 1048576ull

#define MAX_GPUS 16
#define MAX_MIGS 7
#define MAX_PROCS 1024
#define MAX_FAULTS 32
#define TEXT 96

static const struct { int code; const char *name; const char *text; } CODES[] = {
    {0, "NVML_SUCCESS", "Success"},
    {1, "NVML_ERROR_UNINITIALIZED", "Uninitialized"},
    {2, "NVML_ERROR_INVALID_ARGUMENT", "Invalid Argument"},
    {3, "NVML_ERROR_NOT_SUPPORTED", "Not Supported"},
    {4, "NVML_ERROR_NO_PERMISSION", "Insufficient Permissions"},
    {5, "NVML_ERROR_ALREADY_INITIALIZED", "Already Initialized"},
    {6, "NVML_ERROR_NOT_FOUND", "Not Found"},
    {7, "NVML_ERROR_INSUFFICIENT_SIZE", "Insufficient Size"},
    {8, "NVML_ERROR_INSUFFICIENT_POWER", "Insufficient External Power"},
    {9, "NVML_ERROR_DRIVER_NOT_LOADED", "Driver Not Loaded"},
    {10, "NVML_ERROR_TIMEOUT", "Timeout"},
    {11, "NVML_ERROR_IRQ_ISSUE", "Interrupt Request Issue"},
    {12, "NVML_ERROR_LIBRARY_NOT_FOUND", "NVML Shared Library Not Found"},
    {13, "NVML_ERROR_FUNCTION_NOT_FOUND", "Function Not Found"},
    {14, "NVML_ERROR_CORRUPTED_INFOROM", "Corrupted infoROM"},
    {15, "NVML_ERROR_GPU_IS_LOST", "GPU is lost"},
    {16, "NVML_ERROR_RESET_REQUIRED", "GPU requires restart"},
    {17, "NVML_ERROR_OPERATING_SYSTEM", "The operating system has blocked the request."},
    {18, "NVML_ERROR_LIB_RM_VERSION_MISMATCH", "RM has detected an NVML/RM version mismatch."},
    {19, "NVML_ERROR_IN_USE", "In use by another client"},
    {20, "NVML_ERROR_MEMORY", "Insufficient Memory"},
    {21, "NVML_ERROR_NO_DATA", "No data"},
    {25, "NVML_ERROR_ARGUMENT_VERSION_MISMATCH", "Argument version mismatch"},
    {999, "NVML_ERROR_UNKNOWN", "Unknown Error"},
};
#define NCODES ((int)(sizeof CODES / sizeof CODES[0]))

/* Quantities read from the config; -1 means "not given", which NVML answers NOT_SUPPORTED. */
struct gpu {
    char name[TEXT], uuid[TEXT];
    long long mem_total, mem_used, mem_reserved; /* MiB */
    long long util_gpu, util_mem, temp_c, power_mw;
    long long mig; /* -1: not MIG capable, 0: disabled, 1: enabled */
};
/* profile: index into PROFILES, or -1 (a driver that reports no profile: the MIG profile calls
 * answer NOT_SUPPORTED for it); gi, ci: its GPU and compute instance ids; ci_slices: its compute
 * instance's share of the GPU instance's slices. */
struct mig {
    int present, profile;
    char uuid[TEXT];
    long long mem_total, mem_used, gi, ci, ci_slices;
};

/* The GPU instance profiles of an A100 80GB / H100 80GB as NVML lists them: `index` is the
 * NVML_GPU_INSTANCE_PROFILE_* constant nvmlDeviceGetGpuInstanceProfileInfoV takes, `id` the
 * profile id a GPU instance reports (nvmlGpuInstanceGetInfo), as on an A100-SXM4-80GB. */
static const struct {
    const char *name; unsigned index, id, slices; unsigned long long memory_mb;
} PROFILES[] = {
    {"1g.10gb", 0, 19, 1, 9728}, {"2g.20gb", 1, 14, 2, 19968}, {"3g.40gb", 2, 9, 3, 40192},
    {"4g.40gb", 3, 5, 4, 40192}, {"7g.80gb", 4, 0, 7, 80896}, {"1g.10gb+me", 7, 20, 1, 9728},
    {"1g.20gb", 9, 15, 1, 19968},
};
#define NPROFILES ((int)(sizeof PROFILES / sizeof PROFILES[0]))
/* kind: 0 compute, 1 graphics, 2 MPS client; mig: the MIG device it runs on, or -1. */
struct proc { int gpu, mig, kind; unsigned pid; long long used_mib; };
struct fault { char function[64]; int gpu; int code; };

static struct {
    char driver[80];
    long long cuda;
    int jetson, ngpus, nprocs, nfaults;
    struct gpu gpus[MAX_GPUS];
    struct mig migs[MAX_GPUS][MAX_MIGS];
    struct proc procs[MAX_PROCS];
    struct fault faults[MAX_FAULTS];
} cfg;

/* A handle points into this table: column 0 is the whole GPU, column 1+m its MIG device m. */
struct nvmlDevice_st { int gpu, mig; };
typedef struct nvmlDevice_st *nvmlDevice_t;
static struct nvmlDevice_st handles[MAX_GPUS][1 + MAX_MIGS];
static int refcount;

typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t; /* nvmlProcessInfo_v2_t: the _v2 and _v3 calls */
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
} nvmlProcessInfo_v1_t; /* the original calls */

static int parse_code(const char *text) {
    for (int i = 0; i < NCODES; i++)
        if (strcmp(text, CODES[i].name) == 0) return CODES[i].code;
    char *end;
    long value = strtol(text, &end, 10);
    return *text && !*end ? (int)value : -1;
}

/* Split a line into words in place; key="a quoted value" keeps its spaces, minus the quotes. */
static int split(char *line, char **words, int most) {
    int n = 0;
    char *p = line;
    while (*p && n < most) {
        while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
        if (!*p || *p == '#') break;
        words[n++] = p;
        char *out = p;
        int quoted = 0;
        for (; *p && (quoted || (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r')); p++) {
            if (*p == '"') quoted = !quoted;
            else *out++ = *p;
        }
        if (*p) p++;
        *out = '\0';
    }
    return n;
}

static const char *value_of(char **words, int n, const char *key) {
    size_t len = strlen(key);
    for (int i = 1; i < n; i++)
        if (strncmp(words[i], key, len) == 0 && words[i][len] == '=') return words[i] + len + 1;
    return NULL;
}

static long long number(char **words, int n, const char *key, long long fallback) {
    const char *v = value_of(words, n, key);
    return v ? strtoll(v, NULL, 10) : fallback;
}

static void copy(char *to, const char *from) {
    snprintf(to, TEXT, "%s", from);
}

static int bad(const char *path, int line, const char *why) {
    fprintf(stderr, "fake NVML: %s line %d: %s\n", path, line, why);
    return NVML_ERROR_UNKNOWN;
}

/* Parse the config text in file (config path for messages): NVML_SUCCESS or UNKNOWN. */
static nvmlReturn_t parse_config(FILE *file, const char *path) {
    memset(&cfg, 0, sizeof cfg);
    cfg.cuda = -1;
    char line[4096];
    char *w[64];
    int lineno = 0, status = 0;
    while (status == 0 && fgets(line, sizeof line, file)) {
        lineno++;
        int n = split(line, w, 64);
        if (n == 0) continue;
        if (strcmp(w[0], "driver") == 0 && n == 2) {
            snprintf(cfg.driver, sizeof cfg.driver, "%s", w[1]);
        } else if (strcmp(w[0], "cuda") == 0 && n == 2) {
            cfg.cuda = strtoll(w[1], NULL, 10);
        } else if (strcmp(w[0], "jetson") == 0) {
            cfg.jetson = 1;
        } else if (strcmp(w[0], "gpu") == 0) {
            int i = (int)number(w, n, "index", cfg.ngpus);
            if (i < 0 || i >= MAX_GPUS) {
                status = bad(path, lineno, "gpu index out of range");
                break;
            }
            struct gpu *g = &cfg.gpus[i];
            const char *name = value_of(w, n, "name"), *uuid = value_of(w, n, "uuid");
            copy(g->name, name ? name : "");
            copy(g->uuid, uuid ? uuid : "");
            g->mem_total = number(w, n, "mem_total_mib", -1);
            g->mem_used = number(w, n, "mem_used_mib", 0);
            g->mem_reserved = number(w, n, "mem_reserved_mib", 0);
            g->util_gpu = number(w, n, "util_gpu", -1);
            g->util_mem = number(w, n, "util_mem", 0);
            g->temp_c = number(w, n, "temp_c", -1);
            g->power_mw = number(w, n, "power_mw", -1);
            g->mig = number(w, n, "mig", -1);
            if (i >= cfg.ngpus) cfg.ngpus = i + 1;
        } else if (strcmp(w[0], "mig") == 0) {
            int parent = (int)number(w, n, "parent", -1), i = (int)number(w, n, "index", -1);
            if (parent < 0 || parent >= MAX_GPUS || i < 0 || i >= MAX_MIGS) {
                status = bad(path, lineno, "mig needs parent= and index= in range");
                break;
            }
            struct mig *m = &cfg.migs[parent][i];
            const char *uuid = value_of(w, n, "uuid");
            const char *profile = value_of(w, n, "profile");
            m->present = 1;
            m->profile = -1;
            for (int k = 0; profile && k < NPROFILES; k++)
                if (strcmp(profile, PROFILES[k].name) == 0) m->profile = k;
            if (profile && m->profile < 0) {
                status = bad(path, lineno, "unknown MIG profile (see PROFILES in fake_nvml.c)");
                break;
            }
            copy(m->uuid, uuid ? uuid : "MIG-00000000-0000-0000-0000-000000000000");
            m->mem_total = number(w, n, "mem_total_mib",
                                  m->profile < 0 ? 0 : (long long)PROFILES[m->profile].memory_mb);
            m->mem_used = number(w, n, "mem_used_mib", 0);
            m->gi = number(w, n, "gi", i);
            m->ci = number(w, n, "ci", 0);
            m->ci_slices = number(w, n, "ci_slices",
                                  m->profile < 0 ? 0 : (long long)PROFILES[m->profile].slices);
        } else if (strcmp(w[0], "process") == 0) {
            if (cfg.nprocs == MAX_PROCS) {
                status = bad(path, lineno, "too many processes");
                break;
            }
            struct proc *p = &cfg.procs[cfg.nprocs++];
            const char *kind = value_of(w, n, "type");
            p->gpu = (int)number(w, n, "gpu", 0);
            p->mig = (int)number(w, n, "mig", -1);
            p->kind = !kind || strcmp(kind, "compute") == 0 ? 0
                : strcmp(kind, "graphics") == 0 ? 1 : strcmp(kind, "mps") == 0 ? 2 : -1;
            if (p->kind < 0) {
                status = bad(path, lineno, "process type= is compute, graphics or mps");
                break;
            }
            p->pid = (unsigned)number(w, n, "pid", 0);
            p->used_mib = number(w, n, "used_mib", -1);
        } else if (strcmp(w[0], "error") == 0 && n >= 3) {
            if (cfg.nfaults == MAX_FAULTS) {
                status = bad(path, lineno, "too many errors");
                break;
            }
            struct fault *f = &cfg.faults[cfg.nfaults++];
            snprintf(f->function, sizeof f->function, "%s", w[1]);
            f->code = parse_code(w[2]);
            f->gpu = (int)number(w, n, "gpu", -1);
            if (f->code < 0) status = bad(path, lineno, "unknown return code");
        } else {
            status = bad(path, lineno, "unknown line");
        }
    }
    for (int i = 0; i < cfg.ngpus; i++) { /* defaults, once `jetson` may have been seen */
        struct gpu *g = &cfg.gpus[i];
        if (!g->name[0]) copy(g->name, cfg.jetson ? "Orin (nvgpu)" : "NVIDIA Fake GPU");
        if (!g->uuid[0])
            snprintf(g->uuid, TEXT, "%s00000000-0000-0000-0000-%012d", cfg.jetson ? "" : "GPU-", i);
    }
    for (int g = 0; g < MAX_GPUS; g++)
        for (int m = 0; m <= MAX_MIGS; m++) handles[g][m] = (struct nvmlDevice_st){g, m - 1};
    return status;
}

/* The config text last parsed: a call re-reads the file and parses it again only when it
 * changed, so a test can change the GPUs under one NVML session, as a real box does. */
static char *parsed;
static size_t parsed_length;

/* Read the config (afresh with force): NVML_SUCCESS, DRIVER_NOT_LOADED when the file is
 * missing, or UNKNOWN when a line is not understood. */
static nvmlReturn_t load_config(int force) {
    const char *path = getenv("FAKE_NVML_CONFIG");
    FILE *file = path ? fopen(path, "r") : NULL;
    if (!file) return NVML_ERROR_DRIVER_NOT_LOADED;
    size_t length = 0, room = 4096;
    char *text = malloc(room + 1);
    size_t got;
    while (text && (got = fread(text + length, 1, room - length, file)) > 0) {
        length += got;
        if (length == room) text = realloc(text, (room *= 2) + 1);
    }
    fclose(file);
    if (!text) return NVML_ERROR_UNKNOWN;
    text[length] = '\0';
    if (!force && parsed && length == parsed_length && memcmp(text, parsed, length) == 0) {
        free(text);
        return NVML_SUCCESS;
    }
    FILE *memory = fmemopen(text, length + 1, "r");
    nvmlReturn_t status = memory ? parse_config(memory, path) : NVML_ERROR_UNKNOWN;
    if (memory) fclose(memory);
    free(parsed);
    parsed = status == NVML_SUCCESS ? text : NULL;
    parsed_length = status == NVML_SUCCESS ? length : 0;
    if (status != NVML_SUCCESS) free(text);
    return status;
}

/* Return the code an `error` line injects for this function (and GPU), or NVML_SUCCESS. */
static nvmlReturn_t injected(const char *function, int gpu) {
    for (int i = 0; i < cfg.nfaults; i++) {
        const char *f = cfg.faults[i].function;
        int same = strcmp(f, function) == 0
            || (strncmp(function, "nvmlInit", 8) == 0 && strncmp(f, "nvmlInit", 8) == 0);
        if (same && (cfg.faults[i].gpu < 0 || cfg.faults[i].gpu == gpu)) return cfg.faults[i].code;
    }
    return NVML_SUCCESS;
}

static nvmlReturn_t enter(const char *function, int gpu) {
    if (refcount == 0) return NVML_ERROR_UNINITIALIZED;
    nvmlReturn_t ret = load_config(0);
    return ret ? ret : injected(function, gpu);
}

/* Check a device handle and the injected errors; give back the GPU and MIG slot (or -1). */
static nvmlReturn_t enter_device(const char *function, nvmlDevice_t device, int *gpu, int *mig) {
    if (refcount == 0) return NVML_ERROR_UNINITIALIZED;
    nvmlReturn_t loaded = load_config(0);
    if (loaded) return loaded;
    char *p = (char *)device, *start = (char *)handles;
    if (!device || p < start || p >= start + sizeof handles) return NVML_ERROR_INVALID_ARGUMENT;
    if (device->gpu >= cfg.ngpus) return NVML_ERROR_INVALID_ARGUMENT;
    if (device->mig >= 0 && !cfg.migs[device->gpu][device->mig].present)
        return NVML_ERROR_INVALID_ARGUMENT;
    *gpu = device->gpu;
    *mig = device->mig;
    return injected(function, device->gpu);
}

static nvmlReturn_t put_text(char *to, unsigned int length, const char *text) {
    if (!to) return NVML_ERROR_INVALID_ARGUMENT;
    if (length < strlen(text) + 1) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(to, text);
    return NVML_SUCCESS;
}

static nvmlReturn_t init(const char *function) {
    nvmlReturn_t ret = load_config(1);
    if (ret == NVML_SUCCESS) ret = injected(function, -1);
    if (ret == NVML_SUCCESS) refcount++;
    return ret;
}

nvmlReturn_t nvmlInit_v2(void) { return init("nvmlInit_v2"); }

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    return init("nvmlInitWithFlags");
}

nvmlReturn_t nvmlShutdown(void) {
    nvmlReturn_t ret = enter("nvmlShutdown", -1);
    if (ret == NVML_SUCCESS) refcount--;
    return ret;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    for (int i = 0; i < NCODES; i++)
        if (CODES[i].code == result) return CODES[i].text;
    return "Unknown Error";
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    nvmlReturn_t ret = enter("nvmlSystemGetDriverVersion", -1);
    if (ret) return ret;
    if (!cfg.driver[0]) return NVML_ERROR_NOT_SUPPORTED;
    return put_text(version, length, cfg.driver);
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *version) {
    nvmlReturn_t ret = enter("nvmlSystemGetCudaDriverVersion_v2", -1);
    if (ret) return ret;
    if (!version) return NVML_ERROR_INVALID_ARGUMENT;
    if (cfg.cuda < 0) return NVML_ERROR_NOT_SUPPORTED;
    *version = (int)cfg.cuda;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    nvmlReturn_t ret = enter("nvmlDeviceGetCount_v2", -1);
    if (ret) return ret;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    *count = (unsigned)cfg.ngpus;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    nvmlReturn_t ret = enter("nvmlDeviceGetHandleByIndex_v2", (int)index);
    if (ret) return ret;
    if (!device || index >= (unsigned)cfg.ngpus) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &handles[index][0];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    int g, m;
    nvmlReturn_t ret = enter_device("nvmlDeviceGetName", device, &g, &m);
    return ret ? ret : put_text(name, length, cfg.gpus[g].name);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    int g, m;
    nvmlReturn_t ret = enter_device("nvmlDeviceGetUUID", device, &g, &m);
    if (ret) return ret;
    return put_text(uuid, length, m < 0 ? cfg.gpus[g].uuid : cfg.migs[g][m].uuid);
}

/* Fill total/reserved/used/free in MiB; a Jetson's iGPU has no memory of its own to report. */
static nvmlReturn_t memory(const char *function, nvmlDevice_t device, long long out[4]) {
    int g, m;
    nvmlReturn_t ret = enter_device(function, device, &g, &m);
    if (ret) return ret;
    if (cfg.jetson) return NVML_ERROR_NOT_SUPPORTED;
    if (m >= 0) {
        struct mig *mig = &cfg.migs[g][m];
        out[0] = mig->mem_total, out[1] = 0, out[2] = mig->mem_used;
    } else {
        struct gpu *gpu = &cfg.gpus[g];
        if (gpu->mem_total < 0) return NVML_ERROR_NOT_SUPPORTED;
        out[0] = gpu->mem_total, out[1] = gpu->mem_reserved, out[2] = gpu->mem_used;
    }
    out[3] = out[0] - out[1] - out[2];
    return NVML_SUCCESS;
}

/* Version 1 counts reserved memory as used; version 2 reports it apart. */
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *info) {
    long long mib[4];
    nvmlReturn_t ret = memory("nvmlDeviceGetMemoryInfo", device, mib);
    if (ret) return ret;
    if (!info) return NVML_ERROR_INVALID_ARGUMENT;
    info->total = mib[0] * MIB;
    info->used = (mib[1] + mib[2]) * MIB;
    info->free = mib[3] * MIB;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *info) {
    long long mib[4];
    nvmlReturn_t ret = memory("nvmlDeviceGetMemoryInfo_v2", device, mib);
    if (ret) return ret;
    if (!info) return NVML_ERROR_INVALID_ARGUMENT;
    if (info->version != NVML_MEMORY_V2) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    info->total = mib[0] * MIB;
    info->reserved = mib[1] * MIB;
    info->used = mib[2] * MIB;
    info->free = mib[3] * MIB;
    return NVML_SUCCESS;
}

/* Whole-GPU sensors: MIG devices, and a GPU in MIG mode for utilisation, answer NOT_SUPPORTED. */
static nvmlReturn_t sensor(const char *function, nvmlDevice_t device, struct gpu **gpu) {
    int g, m;
    nvmlReturn_t ret = enter_device(function, device, &g, &m);
    if (ret) return ret;
    if (m >= 0) return NVML_ERROR_NOT_SUPPORTED;
    *gpu = &cfg.gpus[g];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *util) {
    struct gpu *g;
    nvmlReturn_t ret = sensor("nvmlDeviceGetUtilizationRates", device, &g);
    if (ret) return ret;
    if (cfg.jetson || g->mig == 1 || g->util_gpu < 0) return NVML_ERROR_NOT_SUPPORTED;
    if (!util) return NVML_ERROR_INVALID_ARGUMENT;
    util->gpu = (unsigned)g->util_gpu;
    util->memory = (unsigned)g->util_mem;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, int sensorType, unsigned int *temp) {
    struct gpu *g;
    nvmlReturn_t ret = sensor("nvmlDeviceGetTemperature", device, &g);
    if (ret) return ret;
    if (!temp || sensorType != 0) return NVML_ERROR_INVALID_ARGUMENT; /* NVML_TEMPERATURE_GPU */
    if (g->temp_c < 0) return NVML_ERROR_NOT_SUPPORTED;
    *temp = (unsigned)g->temp_c;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power) {
    struct gpu *g;
    nvmlReturn_t ret = sensor("nvmlDeviceGetPowerUsage", device, &g);
    if (ret) return ret;
    if (!power) return NVML_ERROR_INVALID_ARGUMENT;
    if (g->power_mw < 0) return NVML_ERROR_NOT_SUPPORTED;
    *power = (unsigned)g->power_mw;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *current,
                                  unsigned int *pending) {
    struct gpu *g;
    nvmlReturn_t ret = sensor("nvmlDeviceGetMigMode", device, &g);
    if (ret) return ret;
    if (!current || !pending) return NVML_ERROR_INVALID_ARGUMENT;
    if (cfg.jetson || g->mig < 0) return NVML_ERROR_NOT_SUPPORTED;
    *current = *pending = (unsigned)g->mig;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count) {
    struct gpu *g;
    nvmlReturn_t ret = sensor("nvmlDeviceGetMaxMigDeviceCount", device, &g);
    if (ret) return ret;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    if (cfg.jetson || g->mig < 0) return NVML_ERROR_NOT_SUPPORTED;
    *count = MAX_MIGS;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index,
                                                 nvmlDevice_t *migDevice) {
    struct gpu *g;
    nvmlReturn_t ret = sensor("nvmlDeviceGetMigDeviceHandleByIndex", device, &g);
    if (ret == NVML_ERROR_NOT_SUPPORTED) return NVML_ERROR_INVALID_ARGUMENT; /* a MIG handle */
    if (ret) return ret;
    if (cfg.jetson || g->mig < 0) return NVML_ERROR_NOT_SUPPORTED;
    if (!migDevice || index >= MAX_MIGS) return NVML_ERROR_INVALID_ARGUMENT;
    if (g->mig != 1 || !cfg.migs[device->gpu][index].present) return NVML_ERROR_NOT_FOUND;
    *migDevice = &handles[device->gpu][1 + index];
    return NVML_SUCCESS;
}

/* On entry *count is the room in infos; NVML sets it to the number of processes and answers
 * INSUFFICIENT_SIZE when they do not fit (infos may be NULL to ask for the count). A MIG
 * device lists its own processes; its parent, in MIG mode, lists none to a user who is not
 * root (the appliance's service account), as the real library does. v1 fills the shorter
 * nvmlProcessInfo_v1_t. */
__attribute__((unused))
static nvmlReturn_t processes(const char *function, int kind, int v1, nvmlDevice_t device,
                              unsigned int *count, void *infos) {
    int g, m;
    nvmlReturn_t ret = enter_device(function, device, &g, &m);
    if (ret) return ret;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    if (m < 0 && cfg.gpus[g].mig == 1) return NVML_ERROR_NO_PERMISSION;
    unsigned int n = 0;
    for (int i = 0; i < cfg.nprocs; i++) {
        struct proc *p = &cfg.procs[i];
        n += p->gpu == g && p->kind == kind && (m < 0 || p->mig == m);
    }
    if (*count < n) {
        *count = n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    if (n > 0 && !infos) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned int k = 0;
    for (int i = 0; i < cfg.nprocs; i++) {
        struct proc *p = &cfg.procs[i];
        if (p->gpu != g || p->kind != kind || (m >= 0 && p->mig != m)) continue;
        unsigned long long used =
            p->used_mib < 0 ? NOT_AVAILABLE_ULL : (unsigned long long)p->used_mib * MIB;
        if (v1) {
            nvmlProcessInfo_v1_t *info = (nvmlProcessInfo_v1_t *)infos + k;
            info->pid = p->pid;
            info->usedGpuMemory = used;
        } else {
            nvmlProcessInfo_t *info = (nvmlProcessInfo_t *)infos + k;
            info->pid = p->pid;
            info->usedGpuMemory = used;
            info->gpuInstanceId = info->computeInstanceId =
                p->mig < 0 ? 0xFFFFFFFFu : (unsigned)p->mig;
        }
        k++;
    }
    *count = n;
    return NVML_SUCCESS;
}

#define PROCESS_CALL(NAME, KIND, V1)                                                        \
    nvmlReturn_t NAME(nvmlDevice_t device, unsigned int *count, void *infos) {               \
        return processes(#NAME, KIND, V1, device, count, infos);                             \
    }

#ifndef FAKE_NVML_NO_V3
PROCESS_CALL(nvmlDeviceGetComputeRunningProcesses_v3, 0, 0)
PROCESS_CALL(nvmlDeviceGetGraphicsRunningProcesses_v3, 1, 0)
PROCESS_CALL(nvmlDeviceGetMPSComputeRunningProcesses_v3, 2, 0)
#endif
#ifndef FAKE_NVML_NO_V2
PROCESS_CALL(nvmlDeviceGetComputeRunningProcesses_v2, 0, 0)
PROCESS_CALL(nvmlDeviceGetGraphicsRunningProcesses_v2, 1, 0)
PROCESS_CALL(nvmlDeviceGetMPSComputeRunningProcesses_v2, 2, 0)
#endif
#ifndef FAKE_NVML_NO_V1
PROCESS_CALL(nvmlDeviceGetComputeRunningProcesses, 0, 1)
PROCESS_CALL(nvmlDeviceGetGraphicsRunningProcesses, 1, 1)
PROCESS_CALL(nvmlDeviceGetMPSComputeRunningProcesses, 2, 1)
#endif

#ifndef FAKE_NVML_NO_MIG_PROFILE
/* MIG profiles: a MIG device's instance ids and attributes (any user), and its GPU instance
 * with that instance's profile, reached through the parent (root only on a real driver:
 * inject NVML_ERROR_NO_PERMISSION to read as the service account). -DFAKE_NVML_NO_MIG_PROFILE
 * leaves them all out, as a driver without them. */
typedef struct {
    unsigned int multiprocessorCount, sharedCopyEngineCount, sharedDecoderCount,
        sharedEncoderCount, sharedJpegCount, sharedOfaCount, gpuInstanceSliceCount,
        computeInstanceSliceCount;
    unsigned long long memorySizeMB;
} nvmlDeviceAttributes_t;
typedef struct { unsigned int start, size; } nvmlGpuInstancePlacement_t;
typedef struct nvmlDevice_st *nvmlGpuInstance_t; /* the fake's GPU instance is its MIG slot */
typedef struct {
    nvmlDevice_t device;
    unsigned int id, profileId;
    nvmlGpuInstancePlacement_t placement;
} nvmlGpuInstanceInfo_t;
typedef struct {
    unsigned int version, id, isP2pSupported, sliceCount, instanceCount, multiprocessorCount,
        copyEngineCount, decoderCount, encoderCount, jpegCount, ofaCount;
    unsigned long long memorySizeMB;
    char name[96];
} nvmlGpuInstanceProfileInfo_v2_t;
#define NVML_GPU_INSTANCE_PROFILE_INFO_V2 0x02000098u

/* Enter a call on a MIG device with a profile: NOT_SUPPORTED for a whole GPU or a device
 * whose `mig` line gave none. */
static nvmlReturn_t enter_mig(const char *function, nvmlDevice_t device, struct mig **mig) {
    int g, m;
    nvmlReturn_t ret = enter_device(function, device, &g, &m);
    if (ret) return ret;
    if (m < 0 || cfg.migs[g][m].profile < 0) return NVML_ERROR_NOT_SUPPORTED;
    *mig = &cfg.migs[g][m];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t device, unsigned int *id) {
    struct mig *m;
    nvmlReturn_t ret = enter_mig("nvmlDeviceGetGpuInstanceId", device, &m);
    if (ret) return ret;
    if (!id) return NVML_ERROR_INVALID_ARGUMENT;
    *id = (unsigned)m->gi;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t device, unsigned int *id) {
    struct mig *m;
    nvmlReturn_t ret = enter_mig("nvmlDeviceGetComputeInstanceId", device, &m);
    if (ret) return ret;
    if (!id) return NVML_ERROR_INVALID_ARGUMENT;
    *id = (unsigned)m->ci;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetAttributes_v2(nvmlDevice_t device, nvmlDeviceAttributes_t *out) {
    struct mig *m;
    nvmlReturn_t ret = enter_mig("nvmlDeviceGetAttributes_v2", device, &m);
    if (ret) return ret;
    if (!out) return NVML_ERROR_INVALID_ARGUMENT;
    memset(out, 0, sizeof *out);
    out->gpuInstanceSliceCount = PROFILES[m->profile].slices;
    out->computeInstanceSliceCount = (unsigned)m->ci_slices;
    out->multiprocessorCount = 14 * (unsigned)m->ci_slices;
    out->memorySizeMB = (unsigned long long)m->mem_total;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetGpuInstanceById(nvmlDevice_t device, unsigned int id,
                                          nvmlGpuInstance_t *instance) {
    struct gpu *g;
    nvmlReturn_t ret = sensor("nvmlDeviceGetGpuInstanceById", device, &g);
    if (ret == NVML_ERROR_NOT_SUPPORTED) return NVML_ERROR_INVALID_ARGUMENT; /* a MIG handle */
    if (ret) return ret;
    if (!instance) return NVML_ERROR_INVALID_ARGUMENT;
    if (g->mig != 1) return NVML_ERROR_NOT_SUPPORTED;
    for (int m = 0; m < MAX_MIGS; m++) {
        struct mig *mig = &cfg.migs[device->gpu][m];
        if (mig->present && mig->profile >= 0 && mig->gi == (long long)id) {
            *instance = &handles[device->gpu][1 + m];
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

nvmlReturn_t nvmlGpuInstanceGetInfo(nvmlGpuInstance_t instance, nvmlGpuInstanceInfo_t *info) {
    struct mig *m;
    nvmlReturn_t ret = enter_mig("nvmlGpuInstanceGetInfo", instance, &m);
    if (ret) return ret;
    if (!info) return NVML_ERROR_INVALID_ARGUMENT;
    info->device = &handles[instance->gpu][0];
    info->id = (unsigned)m->gi;
    info->profileId = PROFILES[m->profile].id;
    info->placement.start = 0;
    info->placement.size = PROFILES[m->profile].slices;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetGpuInstanceProfileInfoV(nvmlDevice_t device, unsigned int profile,
                                                  nvmlGpuInstanceProfileInfo_v2_t *info) {
    struct gpu *g;
    nvmlReturn_t ret = sensor("nvmlDeviceGetGpuInstanceProfileInfoV", device, &g);
    if (ret == NVML_ERROR_NOT_SUPPORTED) return NVML_ERROR_INVALID_ARGUMENT; /* a MIG handle */
    if (ret) return ret;
    if (!info) return NVML_ERROR_INVALID_ARGUMENT;
    if (info->version != NVML_GPU_INSTANCE_PROFILE_INFO_V2)
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    if (cfg.jetson || g->mig < 0) return NVML_ERROR_NOT_SUPPORTED;
    for (int k = 0; k < NPROFILES; k++) {
        if (PROFILES[k].index != profile) continue;
        info->id = PROFILES[k].id;
        info->isP2pSupported = 0;
        info->sliceCount = PROFILES[k].slices;
        info->instanceCount = 7 / PROFILES[k].slices;
        info->multiprocessorCount = 14 * PROFILES[k].slices;
        info->copyEngineCount = PROFILES[k].slices;
        info->decoderCount = info->jpegCount = info->ofaCount =
            strstr(PROFILES[k].name, "+me") ? 1 : 0;
        info->encoderCount = 0;
        info->memorySizeMB = PROFILES[k].memory_mb;
        snprintf(info->name, sizeof info->name, "MIG %s", PROFILES[k].name);
        return NVML_SUCCESS;
    }
    return NVML_ERROR_INVALID_ARGUMENT; /* a profile this GPU does not have */
}
#endif
