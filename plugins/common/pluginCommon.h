/*
 * TensorRT-side helpers shared by the plugins: names, logging through the ILoggerFinder that
 * TensorRT hands to setLoggerFinder(), and PluginField parsing.
 * Only APIs present in both TensorRT 10.x (>= 10.0) and 11.x are used.
 */
#pragma once

#include "kernelTypes.h"

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>

namespace llamaexport
{
namespace plugin
{

//! All our creators live in this namespace, version "1"; the ONNX nodes carry the same values in
//! their plugin_namespace / plugin_version attributes.
constexpr char const* kPLUGIN_NAMESPACE = "llamaexport";
constexpr char const* kPLUGIN_VERSION = "1";

//! Called from setLoggerFinder(); thread-safe.
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;

//! Logs through TensorRT's logger when one was provided, else errors go to stderr.
void log(nvinfer1::ILogger::Severity severity, std::string const& msg) noexcept;

inline void logError(std::string const& msg) noexcept
{
    log(nvinfer1::ILogger::Severity::kERROR, msg);
}

//! fp32 / fp16 / bf16 -> the kernels' DType; false for any other type.
bool toKernelType(nvinfer1::DataType t, DType& out) noexcept;

//! Reads a scalar integer field (kINT32 as the ONNX parser sends it; kINT64/kINT16/kINT8 accepted).
bool readIntField(nvinfer1::PluginField const& f, int32_t& out) noexcept;

//! True for the fields the ONNX parser may forward from the node that only select the plugin.
bool isSelectorField(char const* name) noexcept;

} // namespace plugin
} // namespace llamaexport
