/*
 * A stand-in for NVIDIA's libnvidia-ml, for tests on machines without GPUs.
 *
 * It exports only the NVML functions the agent's nvml-wrapper calls, and
 * reports two GPUs: "Fake GPU 0" (16 GiB) and "Fake GPU 1" (24 GiB).
 *
 * What they report comes from the file named by FAKE_NVML_STATE, read again
 * on every call so a test can change it while the agent runs. One line per
 * GPU, in index order:
 *
 *     util_percent mem_used_mib temp_c power_mw
 *
 * A line reading "fail" makes every query for that GPU fail with
 * NVML_ERROR_UNKNOWN. Without FAKE_NVML_STATE the figures move with a call
 * counter, so the use still changes.
 *
 * Build: cc -shared -fPIC -o libnvidia-ml.so.1 fake_nvml.c
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;

#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_ARGUMENT_VERSION_MISMATCH 25
#define NVML_ERROR_UNKNOWN 999

#define NVML_TEMPERATURE_GPU 0
#define GPU_COUNT 2u
#define MIB (1024ull * 1024ull)

struct nvmlDevice_st {
    unsigned int index;
};
typedef struct nvmlDevice_st *nvmlDevice_t;

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

/* NVML_STRUCT_VERSION(Memory, 2), as nvml.h defines it. */
#define NVML_MEMORY_V2 ((unsigned int)(sizeof(nvmlMemory_v2_t) | (2u << 24)))

static struct nvmlDevice_st devices[GPU_COUNT] = {{0}, {1}};
static const unsigned long long total_mib[GPU_COUNT] = {16384, 24576};
static int initialized;
static unsigned long long calls;

struct reading {
    unsigned int util;
    unsigned long long mem_mib;
    unsigned int temp_c;
    unsigned int power_mw;
};

/* Fills `r` for GPU `index`; returns NVML_SUCCESS or the error to report. */
static nvmlReturn_t read_state(unsigned int index, struct reading *r) {
    const char *path = getenv("FAKE_NVML_STATE");
    calls++;
    if (path == NULL) {
        r->util = (unsigned int)((calls * 7 + index * 30) % 101);
        r->mem_mib = (calls * 64 + index * 1024) % total_mib[index];
        r->temp_c = (unsigned int)(40 + (calls + index) % 30);
        r->power_mw = (unsigned int)(50000 + (calls % 100) * 1000);
        return NVML_SUCCESS;
    }
    FILE *file = fopen(path, "r");
    if (file == NULL) {
        return NVML_ERROR_UNKNOWN;
    }
    char line[256];
    unsigned int at = 0;
    nvmlReturn_t result = NVML_ERROR_UNKNOWN;
    while (fgets(line, sizeof line, file) != NULL) {
        if (at++ != index) {
            continue;
        }
        if (strncmp(line, "fail", 4) != 0 &&
            sscanf(line, "%u %llu %u %u", &r->util, &r->mem_mib, &r->temp_c, &r->power_mw) == 4) {
            result = NVML_SUCCESS;
        }
        break;
    }
    fclose(file);
    return result;
}

static nvmlReturn_t device_index(nvmlDevice_t device, unsigned int *index) {
    if (!initialized) {
        return NVML_ERROR_UNINITIALIZED;
    }
    for (unsigned int i = 0; i < GPU_COUNT; i++) {
        if (device == &devices[i]) {
            *index = i;
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_INVALID_ARGUMENT;
}

nvmlReturn_t nvmlInit_v2(void) {
    initialized = 1;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlShutdown(void) {
    if (!initialized) {
        return NVML_ERROR_UNINITIALIZED;
    }
    initialized = 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    const char *fake = "999.99.99";
    if (version == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if (length < strlen(fake) + 1) {
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    strcpy(version, fake);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!initialized) {
        return NVML_ERROR_UNINITIALIZED;
    }
    if (count == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *count = GPU_COUNT;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (!initialized) {
        return NVML_ERROR_UNINITIALIZED;
    }
    if (index >= GPU_COUNT || device == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *device = &devices[index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    unsigned int index;
    nvmlReturn_t result = device_index(device, &index);
    if (result != NVML_SUCCESS) {
        return result;
    }
    if (name == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    int needed = snprintf(name, length, "Fake GPU %u", index);
    return needed < 0 || (unsigned int)needed >= length ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization) {
    unsigned int index;
    struct reading r;
    nvmlReturn_t result = device_index(device, &index);
    if (result == NVML_SUCCESS && utilization == NULL) {
        result = NVML_ERROR_INVALID_ARGUMENT;
    }
    if (result == NVML_SUCCESS) {
        result = read_state(index, &r);
    }
    if (result == NVML_SUCCESS) {
        utilization->gpu = r.util;
        utilization->memory = r.util / 2;
    }
    return result;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    unsigned int index;
    struct reading r;
    nvmlReturn_t result = device_index(device, &index);
    if (result == NVML_SUCCESS && memory == NULL) {
        result = NVML_ERROR_INVALID_ARGUMENT;
    }
    if (result == NVML_SUCCESS && memory->version != NVML_MEMORY_V2) {
        result = NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    }
    if (result == NVML_SUCCESS) {
        result = read_state(index, &r);
    }
    if (result == NVML_SUCCESS) {
        unsigned long long used = (r.mem_mib < total_mib[index] ? r.mem_mib : total_mib[index]) * MIB;
        memory->total = total_mib[index] * MIB;
        memory->reserved = 0;
        memory->used = used;
        memory->free = memory->total - used;
    }
    return result;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, int sensor, unsigned int *temperature) {
    unsigned int index;
    struct reading r;
    nvmlReturn_t result = device_index(device, &index);
    if (result == NVML_SUCCESS && (temperature == NULL || sensor != NVML_TEMPERATURE_GPU)) {
        result = NVML_ERROR_INVALID_ARGUMENT;
    }
    if (result == NVML_SUCCESS) {
        result = read_state(index, &r);
    }
    if (result == NVML_SUCCESS) {
        *temperature = r.temp_c;
    }
    return result;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power) {
    unsigned int index;
    struct reading r;
    nvmlReturn_t result = device_index(device, &index);
    if (result == NVML_SUCCESS && power == NULL) {
        result = NVML_ERROR_INVALID_ARGUMENT;
    }
    if (result == NVML_SUCCESS) {
        result = read_state(index, &r);
    }
    if (result == NVML_SUCCESS) {
        *power = r.power_mw;
    }
    return result;
}
