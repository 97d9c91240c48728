#include "ropePlugin.h"

#include "ropeKernel.h"

#include <climits>
#include <cstring>
#include <exception>

using namespace nvinfer1;

namespace llamaexport
{
namespace plugin
{
namespace
{
constexpr char const* kROPE_NAME = "RoPE";
constexpr int32_t kNB_INPUTS = 3; // x, cos, sin

bool isFloatType(DataType t)
{
    return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16;
}

bool fitsInt32(int64_t v)
{
    return v >= 0 && v <= INT32_MAX;
}
} // namespace

// ---------------------------------------------------------------------------------------------------------------------
// RopePlugin

RopePlugin::RopePlugin(int32_t interleaved, int32_t rotaryDim)
    : mInterleaved(interleaved)
    , mRotaryDim(rotaryDim)
{
    initFields();
}

RopePlugin::RopePlugin(RopePlugin const& other)
    : mInterleaved(other.mInterleaved)
    , mRotaryDim(other.mRotaryDim)
{
    initFields();
}

void RopePlugin::initFields()
{
    mFields.clear();
    mFields.emplace_back("interleaved", &mInterleaved, PluginFieldType::kINT32, 1);
    mFields.emplace_back("rotary_dim", &mRotaryDim, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
    mMetadata = "interleaved=" + std::to_string(mInterleaved) + ", rotary_dim="
        + (mRotaryDim > 0 ? std::to_string(mRotaryDim) : std::string("2*cos.shape[-1]"));
}

IPluginCapability* RopePlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    }
    return nullptr;
}

IPluginV3* RopePlugin::clone() noexcept
{
    try
    {
        return new RopePlugin(*this);
    }
    catch (std::exception const& e)
    {
        logError(std::string("RoPE clone failed: ") + e.what());
    }
    return nullptr;
}

char const* RopePlugin::getPluginName() const noexcept
{
    return kROPE_NAME;
}

char const* RopePlugin::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* RopePlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

int32_t RopePlugin::getNbOutputs() const noexcept
{
    return 1;
}

int32_t RopePlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != 1)
    {
        logError("RoPE expects 3 inputs (x, cos, sin) and 1 output");
        return -1;
    }
    outputTypes[0] = inputTypes[0];
    return 0;
}

int32_t RopePlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& /*exprBuilder*/) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != 1 || inputs[0].nbDims != 4 || inputs[1].nbDims != 3
        || inputs[2].nbDims != 3)
    {
        logError("RoPE expects x [B, H, S, head_dim], cos [B, S, rotary_dim/2], sin [B, S, rotary_dim/2]");
        return -1;
    }
    outputs[0] = inputs[0];
    return 0;
}

bool RopePlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != 1 || pos < 0 || pos > kNB_INPUTS)
    {
        return false;
    }
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case 0: return isFloatType(d.type);                                              // x
    case 1: return d.type == inOut[0].desc.type || d.type == DataType::kFLOAT;        // cos: x's type or fp32
    case 2: return d.type == inOut[1].desc.type;                                      // sin: as cos
    default: return d.type == inOut[0].desc.type;                                     // y: as x
    }
}

bool RopePlugin::checkDims(Dims const& x, Dims const& cos, Dims const& sin) const noexcept
{
    auto known = [](int64_t v) { return v >= 0; };
    auto mismatch = [&](int64_t a, int64_t b) { return known(a) && known(b) && a != b; };
    if (x.nbDims != 4 || cos.nbDims != 3 || sin.nbDims != 3)
    {
        logError("RoPE expects x [B, H, S, head_dim], cos [B, S, rotary_dim/2], sin [B, S, rotary_dim/2]");
        return false;
    }
    for (int32_t i = 0; i < 3; ++i)
    {
        if (mismatch(cos.d[i], sin.d[i]))
        {
            logError("RoPE: cos and sin must have the same shape");
            return false;
        }
    }
    if (known(cos.d[0]) && known(x.d[0]) && cos.d[0] != x.d[0] && cos.d[0] != 1)
    {
        logError("RoPE: cos/sin dim 0 must equal x's batch or be 1");
        return false;
    }
    if (mismatch(cos.d[1], x.d[2]))
    {
        logError("RoPE: cos/sin dim 1 must equal x's sequence length (dim 2)");
        return false;
    }
    int64_t const rd = mRotaryDim > 0 ? mRotaryDim : (known(cos.d[2]) ? 2 * cos.d[2] : -1);
    if (mRotaryDim > 0 && known(cos.d[2]) && cos.d[2] * 2 != rd)
    {
        logError("RoPE: cos/sin last dim must be rotary_dim/2 = " + std::to_string(rd / 2) + ", got "
            + std::to_string(cos.d[2]));
        return false;
    }
    if (known(rd) && known(x.d[3]) && (rd < 2 || rd > x.d[3]))
    {
        logError("RoPE: rotary_dim " + std::to_string(rd) + " must be in [2, head_dim = " + std::to_string(x.d[3])
            + "]");
        return false;
    }
    return true;
}

int32_t RopePlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/,
    int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != 1)
    {
        return -1;
    }
    return checkDims(in[0].desc.dims, in[1].desc.dims, in[2].desc.dims) ? 0 : -1;
}

size_t RopePlugin::getWorkspaceSize(DynamicPluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    return 0;
}

char const* RopePlugin::getMetadataString() noexcept
{
    return mMetadata.c_str();
}

int32_t RopePlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != 1)
    {
        return -1;
    }
    return checkDims(in[0].dims, in[1].dims, in[2].dims) ? 0 : -1;
}

int32_t RopePlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept
{
    DType xType;
    DType tableType;
    if (!toKernelType(inputDesc[0].type, xType) || !toKernelType(inputDesc[1].type, tableType))
    {
        logError("RoPE: unsupported data type");
        return -1;
    }
    Dims const& x = inputDesc[0].dims;
    Dims const& cos = inputDesc[1].dims;
    int64_t const rd = mRotaryDim > 0 ? mRotaryDim : 2 * cos.d[2];
    if (!fitsInt32(x.d[0]) || !fitsInt32(x.d[1]) || !fitsInt32(x.d[2]) || !fitsInt32(x.d[3]) || !fitsInt32(rd)
        || !fitsInt32(cos.d[0]))
    {
        logError("RoPE: dims out of range");
        return -1;
    }
    RopeShape const shape{static_cast<int32_t>(x.d[0]), static_cast<int32_t>(x.d[1]), static_cast<int32_t>(x.d[2]),
        static_cast<int32_t>(x.d[3]), static_cast<int32_t>(rd), static_cast<int32_t>(cos.d[0])};
    cudaError_t const err
        = ropeLaunch(stream, inputs[0], inputs[1], inputs[2], outputs[0], xType, tableType, shape, mInterleaved != 0);
    if (err != cudaSuccess)
    {
        logError(std::string("RoPE launch failed: ") + cudaGetErrorString(err));
        return -1;
    }
    return 0;
}

IPluginV3* RopePlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

PluginFieldCollection const* RopePlugin::getFieldsToSerialize() noexcept
{
    return &mFieldCollection;
}

// ---------------------------------------------------------------------------------------------------------------------
// RopePluginCreator

RopePluginCreator::RopePluginCreator()
{
    mFieldNames.emplace_back("interleaved", nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back("rotary_dim", nullptr, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

char const* RopePluginCreator::getPluginName() const noexcept
{
    return kROPE_NAME;
}

char const* RopePluginCreator::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* RopePluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

PluginFieldCollection const* RopePluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

IPluginV3* RopePluginCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        int32_t interleaved = 1; // Meta layout, what llamaexport exports
        int32_t rotaryDim = 0;   // 0: 2 * cos.shape[-1]
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            if (f.name == nullptr || isSelectorField(f.name))
            {
                continue;
            }
            int32_t* dst = std::strcmp(f.name, "interleaved") == 0 ? &interleaved
                : std::strcmp(f.name, "rotary_dim") == 0           ? &rotaryDim
                                                                   : nullptr;
            if (dst == nullptr)
            {
                log(ILogger::Severity::kWARNING, std::string("RoPE: ignoring unknown field ") + f.name);
                continue;
            }
            if (!readIntField(f, *dst))
            {
                logError(std::string("RoPE: field ") + f.name + " must be a scalar integer");
                return nullptr;
            }
        }
        if (interleaved != 0 && interleaved != 1)
        {
            logError("RoPE: interleaved must be 0 or 1, got " + std::to_string(interleaved));
            return nullptr;
        }
        if (rotaryDim < 0 || rotaryDim % 2 != 0)
        {
            logError("RoPE: rotary_dim must be even and >= 0, got " + std::to_string(rotaryDim));
            return nullptr;
        }
        return new RopePlugin(interleaved, rotaryDim);
    }
    catch (std::exception const& e)
    {
        logError(std::string("RoPE createPlugin failed: ") + e.what());
    }
    return nullptr;
}

} // namespace plugin
} // namespace llamaexport
