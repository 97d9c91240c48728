#include "swigluPlugin.h"

#include "swigluKernel.h"

#include <climits>
#include <exception>
#include <string>

using namespace nvinfer1;

namespace llamaexport
{
namespace plugin
{
namespace
{
constexpr char const* kSWIGLU_NAME = "SwiGLU";

bool isFloatType(DataType t)
{
    return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16;
}

//! x [..., 2F]: rank >= 2 and, when known, an even last dim.
bool checkInput(Dims const& x)
{
    if (x.nbDims < 2)
    {
        logError("SwiGLU expects x [..., 2F] of rank >= 2");
        return false;
    }
    int64_t const last = x.d[x.nbDims - 1];
    if (last >= 0 && last % 2 != 0)
    {
        logError("SwiGLU: last dim must be even (gate and up halves), got " + std::to_string(last));
        return false;
    }
    return true;
}
} // namespace

IPluginCapability* SwigluPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    }
    return nullptr;
}

IPluginV3* SwigluPlugin::clone() noexcept
{
    try
    {
        return new SwigluPlugin(*this);
    }
    catch (std::exception const& e)
    {
        logError(std::string("SwiGLU clone failed: ") + e.what());
    }
    return nullptr;
}

char const* SwigluPlugin::getPluginName() const noexcept
{
    return kSWIGLU_NAME;
}

char const* SwigluPlugin::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* SwigluPlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

int32_t SwigluPlugin::getNbOutputs() const noexcept
{
    return 1;
}

int32_t SwigluPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbInputs != 1 || nbOutputs != 1)
    {
        logError("SwiGLU expects 1 input and 1 output");
        return -1;
    }
    outputTypes[0] = inputTypes[0];
    return 0;
}

int32_t SwigluPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept
{
    if (nbInputs != 1 || nbOutputs != 1 || inputs[0].nbDims < 2)
    {
        logError("SwiGLU expects x [..., 2F] of rank >= 2");
        return -1;
    }
    int32_t const last = inputs[0].nbDims - 1;
    outputs[0] = inputs[0];
    outputs[0].d[last]
        = exprBuilder.operation(DimensionOperation::kFLOOR_DIV, *inputs[0].d[last], *exprBuilder.constant(2));
    return 0;
}

bool SwigluPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != 1 || nbOutputs != 1 || pos < 0 || pos > 1)
    {
        return false;
    }
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    return pos == 0 ? isFloatType(d.type) : d.type == inOut[0].desc.type;
}

int32_t SwigluPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/,
    int32_t nbOutputs) noexcept
{
    return nbInputs == 1 && nbOutputs == 1 && checkInput(in[0].desc.dims) ? 0 : -1;
}

size_t SwigluPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    return 0;
}

int32_t SwigluPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    return nbInputs == 1 && nbOutputs == 1 && checkInput(in[0].dims) ? 0 : -1;
}

int32_t SwigluPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept
{
    DType type;
    if (!toKernelType(inputDesc[0].type, type))
    {
        logError("SwiGLU: unsupported data type");
        return -1;
    }
    Dims const& x = inputDesc[0].dims;
    int64_t rows = 1;
    for (int32_t i = 0; i + 1 < x.nbDims; ++i)
    {
        rows *= x.d[i];
    }
    int64_t const ffnDim = x.d[x.nbDims - 1] / 2;
    if (rows < 0 || ffnDim < 0 || ffnDim > INT32_MAX)
    {
        logError("SwiGLU: dims out of range");
        return -1;
    }
    cudaError_t const err = swigluLaunch(stream, inputs[0], outputs[0], type, rows, static_cast<int32_t>(ffnDim));
    if (err != cudaSuccess)
    {
        logError(std::string("SwiGLU launch failed: ") + cudaGetErrorString(err));
        return -1;
    }
    return 0;
}

IPluginV3* SwigluPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

PluginFieldCollection const* SwigluPlugin::getFieldsToSerialize() noexcept
{
    return &mNoFields;
}

char const* SwigluPluginCreator::getPluginName() const noexcept
{
    return kSWIGLU_NAME;
}

char const* SwigluPluginCreator::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* SwigluPluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

PluginFieldCollection const* SwigluPluginCreator::getFieldNames() noexcept
{
    return &mNoFields;
}

IPluginV3* SwigluPluginCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            char const* name = fc->fields[i].name;
            if (name != nullptr && !isSelectorField(name))
            {
                log(ILogger::Severity::kWARNING, std::string("SwiGLU: ignoring unknown field ") + name);
            }
        }
        return new SwigluPlugin();
    }
    catch (std::exception const& e)
    {
        logError(std::string("SwiGLU createPlugin failed: ") + e.what());
    }
    return nullptr;
}

} // namespace plugin
} // namespace llamaexport
