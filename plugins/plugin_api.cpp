/*
 * The library's entry points, found by IPluginRegistry::loadLibrary and
 * `trtexec --dynamicPlugins=libllamaexport_plugins.so` (TensorRT >= 10.0):
 *   getCreators     - every plugin creator in this library;
 *   setLoggerFinder - TensorRT's logger, used for the plugins' messages;
 * and, for llamaexport's loader (tensorrt.plugins.check_plugin_library, which reads them with ctypes
 * before TensorRT sees the library):
 *   llamaexport_plugins_trt_major / _minor - the TensorRT headers this library was compiled against.
 * The library registers nothing by itself at load time (loadLibrary would then refuse it as
 * "already registered"), and links only the CUDA runtime, not libnvinfer.
 *
 * The interfaces TensorRT and the library call each other through are C++ vtables fixed by the
 * headers' major version: in TensorRT 11.0 ILogger and ILoggerFinder became IVersionedInterface
 * subclasses (include/NvInferRuntime.h, NVIDIA/TensorRT release/11.0: `class ILogger : public
 * IVersionedInterface`, `class ILoggerFinder : public IVersionedInterface`; release/10.16: no base
 * class), so every virtual method moved by the base's slots. A library built against 10.x headers
 * loaded into 11.x (or the reverse) would call findLogger()/log() through the wrong slot. Hence the
 * recorded major, which the loader compares with the running TensorRT's.
 */
#include "common/pluginCommon.h"
#include "ropePlugin/ropePlugin.h"
#include "swigluPlugin/swigluPlugin.h"

#include <NvInferRuntime.h>
#include <NvInferVersion.h>

// TENSORRTAPI only marks exports while building TensorRT itself (>= 10.x headers), so we use our own.
#define LLAMAEXPORT_PLUGIN_API __attribute__((visibility("default")))

extern "C" LLAMAEXPORT_PLUGIN_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static llamaexport::plugin::RopePluginCreator sRope;
    static llamaexport::plugin::SwigluPluginCreator sSwiglu;
    static nvinfer1::IPluginCreatorInterface* const kCreators[] = {&sRope, &sSwiglu};
    nbCreators = static_cast<int32_t>(sizeof(kCreators) / sizeof(kCreators[0]));
    return kCreators;
}

extern "C" LLAMAEXPORT_PLUGIN_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    llamaexport::plugin::setLoggerFinder(finder);
}

extern "C" LLAMAEXPORT_PLUGIN_API int32_t llamaexport_plugins_trt_major()
{
    return NV_TENSORRT_MAJOR;
}

extern "C" LLAMAEXPORT_PLUGIN_API int32_t llamaexport_plugins_trt_minor()
{
    return NV_TENSORRT_MINOR;
}
