/*
 * A minimal Vulkan layer that removes device extensions from vkCreateDevice (docs/simpler.md, CPU only).
 *
 * sapien 2.2.2's wheel is built with CUDA interop and asks for VK_KHR_external_semaphore_fd when it creates
 * its device; Mesa's lavapipe (the CPU Vulkan driver) does not offer it, so device creation fails. This
 * layer drops the extensions named in DAMVLA_VK_DROP_EXTENSIONS (comma-separated; default
 * VK_KHR_external_semaphore_fd) from the create info and passes everything else through untouched.
 *
 * Build: cc -shared -fPIC -O2 -I<vulkan headers> vk_drop_ext.c -o libVkLayer_damvla_drop_ext.so
 * Enable: VK_LAYER_PATH=<dir with the .so and VkLayer_damvla_drop_ext.json>
 *         VK_INSTANCE_LAYERS=VK_LAYER_DAMVLA_drop_ext
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vulkan/vk_layer.h>
#include <vulkan/vulkan.h>

#define EXPORT __attribute__((visibility("default")))

static PFN_vkGetInstanceProcAddr next_gipa = NULL;
static PFN_vkGetDeviceProcAddr next_gdpa = NULL;

static int dropped(const char *name) {
    const char *list = getenv("DAMVLA_VK_DROP_EXTENSIONS");
    if (list == NULL || *list == '\0') list = "VK_KHR_external_semaphore_fd";
    size_t n = strlen(name);
    for (const char *p = list; *p;) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len == n && strncmp(p, name, n) == 0) return 1;
        if (!end) break;
        p = end + 1;
    }
    return 0;
}

static VkResult VKAPI_CALL layer_CreateInstance(const VkInstanceCreateInfo *info, const VkAllocationCallbacks *alloc,
                                                VkInstance *instance) {
    VkLayerInstanceCreateInfo *link = (VkLayerInstanceCreateInfo *)info->pNext;
    while (link && !(link->sType == VK_STRUCTURE_TYPE_LOADER_INSTANCE_CREATE_INFO && link->function == VK_LAYER_LINK_INFO))
        link = (VkLayerInstanceCreateInfo *)link->pNext;
    if (!link) return VK_ERROR_INITIALIZATION_FAILED;
    next_gipa = link->u.pLayerInfo->pfnNextGetInstanceProcAddr;
    link->u.pLayerInfo = link->u.pLayerInfo->pNext;
    PFN_vkCreateInstance create = (PFN_vkCreateInstance)next_gipa(NULL, "vkCreateInstance");
    return create(info, alloc, instance);
}

static VkResult VKAPI_CALL layer_CreateDevice(VkPhysicalDevice gpu, const VkDeviceCreateInfo *info,
                                              const VkAllocationCallbacks *alloc, VkDevice *device) {
    VkLayerDeviceCreateInfo *link = (VkLayerDeviceCreateInfo *)info->pNext;
    while (link && !(link->sType == VK_STRUCTURE_TYPE_LOADER_DEVICE_CREATE_INFO && link->function == VK_LAYER_LINK_INFO))
        link = (VkLayerDeviceCreateInfo *)link->pNext;
    if (!link) return VK_ERROR_INITIALIZATION_FAILED;
    PFN_vkGetInstanceProcAddr gipa = link->u.pLayerInfo->pfnNextGetInstanceProcAddr;
    next_gdpa = link->u.pLayerInfo->pfnNextGetDeviceProcAddr;
    link->u.pLayerInfo = link->u.pLayerInfo->pNext;

    VkDeviceCreateInfo copy = *info;
    const char **names = malloc(sizeof(char *) * (info->enabledExtensionCount + 1));
    uint32_t kept = 0;
    for (uint32_t i = 0; i < info->enabledExtensionCount; i++) {
        if (dropped(info->ppEnabledExtensionNames[i])) {
            if (getenv("DAMVLA_VK_DROP_VERBOSE")) fprintf(stderr, "damvla layer: dropped %s\n", info->ppEnabledExtensionNames[i]);
            continue;
        }
        names[kept++] = info->ppEnabledExtensionNames[i];
    }
    copy.enabledExtensionCount = kept;
    copy.ppEnabledExtensionNames = names;
    PFN_vkCreateDevice create = (PFN_vkCreateDevice)gipa(NULL, "vkCreateDevice");
    VkResult r = create(gpu, &copy, alloc, device);
    free(names);
    return r;
}

EXPORT VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL damvla_GetDeviceProcAddr(VkDevice device, const char *name);

EXPORT VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL damvla_GetInstanceProcAddr(VkInstance instance, const char *name) {
    if (!strcmp(name, "vkGetInstanceProcAddr")) return (PFN_vkVoidFunction)damvla_GetInstanceProcAddr;
    if (!strcmp(name, "vkGetDeviceProcAddr")) return (PFN_vkVoidFunction)damvla_GetDeviceProcAddr;
    if (!strcmp(name, "vkCreateInstance")) return (PFN_vkVoidFunction)layer_CreateInstance;
    if (!strcmp(name, "vkCreateDevice")) return (PFN_vkVoidFunction)layer_CreateDevice;
    return next_gipa ? next_gipa(instance, name) : NULL;
}

EXPORT VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL damvla_GetDeviceProcAddr(VkDevice device, const char *name) {
    if (!strcmp(name, "vkGetDeviceProcAddr")) return (PFN_vkVoidFunction)damvla_GetDeviceProcAddr;
    return next_gdpa ? next_gdpa(device, name) : NULL;
}
