#include "pluginCommon.h"

#include <cstdio>
#include <cstring>
#include <mutex>

namespace llamaexport
{
namespace plugin
{
namespace
{
std::mutex gLoggerMutex;
nvinfer1::ILoggerFinder* gLoggerFinder{nullptr};
} // namespace

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept
{
    std::lock_guard<std::mutex> lock(gLoggerMutex);
    if (gLoggerFinder == nullptr && finder != nullptr)
    {
        gLoggerFinder = finder;
    }
}

void log(nvinfer1::ILogger::Severity severity, std::string const& msg) noexcept
{
    try
    {
        std::string const line = std::string("[llamaexport plugins] ") + msg;
        nvinfer1::ILogger* logger{nullptr};
        {
            std::lock_guard<std::mutex> lock(gLoggerMutex);
            if (gLoggerFinder != nullptr)
            {
                logger = gLoggerFinder->findLogger();
            }
        }
        if (logger != nullptr)
        {
            logger->log(severity, line.c_str());
        }
        else if (severity <= nvinfer1::ILogger::Severity::kWARNING)
        {
            std::fprintf(stderr, "%s\n", line.c_str());
        }
    }
    catch (...)
    {
    }
}

bool toKernelType(nvinfer1::DataType t, DType& out) noexcept
{
    switch (t)
    {
    case nvinfer1::DataType::kFLOAT: out = DType::kFP32; return true;
    case nvinfer1::DataType::kHALF: out = DType::kFP16; return true;
    case nvinfer1::DataType::kBF16: out = DType::kBF16; return true;
    default: return false;
    }
}

bool readIntField(nvinfer1::PluginField const& f, int32_t& out) noexcept
{
    if (f.data == nullptr || f.length < 1)
    {
        return false;
    }
    switch (f.type)
    {
    case nvinfer1::PluginFieldType::kINT32: out = *static_cast<int32_t const*>(f.data); return true;
    case nvinfer1::PluginFieldType::kINT64:
    {
        int64_t const v = *static_cast<int64_t const*>(f.data);
        if (v < INT32_MIN || v > INT32_MAX)
        {
            return false;
        }
        out = static_cast<int32_t>(v);
        return true;
    }
    case nvinfer1::PluginFieldType::kINT16: out = *static_cast<int16_t const*>(f.data); return true;
    case nvinfer1::PluginFieldType::kINT8: out = *static_cast<int8_t const*>(f.data); return true;
    default: return false;
    }
}

bool isSelectorField(char const* name) noexcept
{
    return name != nullptr && (std::strcmp(name, "plugin_version") == 0 || std::strcmp(name, "plugin_namespace") == 0);
}

} // namespace plugin
} // namespace llamaexport
