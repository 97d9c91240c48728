/*
 * The library's entry points, found by IPluginRegistry::loadLibrary and
 * `trtexec --dynamicPlugins=libllamaexport_plugins.so` (TensorRT >= 10.0):
 *   getCreators     - every plugin creator in this library;
 *   setLoggerFinder - TensorRT's logger, used for the plugins' messages.
 * The library registers nothing by itself at load time (loadLibrary would then refuse it as
 * "already registered"), and links only the CUDA runtime, not libnvinfer.
 */
#include "common/pluginCommon.h"
#include "ropePlugin/ropePlugin.h"
#include "swigluPlugin/swigluPlugin.h"

#include <NvInferRuntime.h>

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
