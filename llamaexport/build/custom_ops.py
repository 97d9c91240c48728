"""Our custom ONNX ops, RoPE and SwiGLU, each with a standard-ONNX function body.

TensorRT maps a node to the plugin creator of the same op name, version `plugin_version` and
namespace `plugin_namespace` (both carried by every node). Which wins over the function body
(matched by name) depends on the TensorRT version, per its ONNX parser:
  10.0-10.6   the local function, always (JetPack 6 / TensorRT 10.3 runs the function bodies);
  10.7-10.14  the plugin, when its library is loaded; else the function;
  >= 10.15    the plugin, when the node carries `plugin_namespace` (ours do) or the parser flag
              kENABLE_PLUGIN_OVERRIDE is set, and the library is loaded; else the function.
ONNX Runtime and every other runtime inline the function body, so the same file runs without
a plugin library.

  RoPE(x [B, H, S, hd], cos [B, S, rd/2], sin [B, S, rd/2]) -> [B, H, S, hd]
      attributes: interleaved (int: 1 = Meta pairs (2j, 2j+1), 0 = halves), rotary_dim (int)
  SwiGLU(x [..., 2F]) -> [..., F] = silu(x[..., :F]) * x[..., F:]
"""

from __future__ import annotations

from llamaexport.build.onnx_graph import OPSET
from llamaexport.tensorrt.plugins import PLUGIN_NAMESPACE, PLUGIN_VERSION

DOMAIN = "llamaexport"
_PLUGIN_ATTRS = ["plugin_version", "plugin_namespace"]


def rope_function(*, head_dim: int, rotary_dim: int, interleaved: bool, opset: int = OPSET):
    """The RoPE FunctionProto, specialised to this model's head_dim / rotary_dim / layout; its body
    imports the model's opset (runtimes want one version of the default domain per model)."""
    from onnx import helper

    n = []

    def node(op, ins, outs, **kw):
        n.append(helper.make_node(op, ins, outs, **kw))

    def const_ints(name, vals):
        node("Constant", [], [name], value_ints=list(vals))

    half = rotary_dim // 2
    if rotary_dim < head_dim:
        for cname, value in (("zero", [0]), ("rd", [rotary_dim]), ("hd", [head_dim]), ("last", [-1])):
            const_ints(cname, value)
        node("Slice", ["x", "zero", "rd", "last"], ["xr"])
        node("Slice", ["x", "rd", "hd", "last"], ["xp"])
        xr = "xr"
    else:
        xr = "x"
    if interleaved:
        # [B, H, S, rd] -> [B, H, S, rd/2, 2]; cos -> [B, 1, S, rd/2, 1]
        for cname, value in (("pairs", [0, 0, 0, half, 2]), ("ax", [1, 4]), ("flat", [0, 0, 0, rotary_dim])):
            const_ints(cname, value)
        node("Reshape", [xr, "pairs"], ["xq"])
        node("Split", ["xq"], ["x1", "x2"], axis=-1, num_outputs=2)
    else:
        const_ints("ax", [1])
        node("Split", [xr], ["x1", "x2"], axis=-1, num_outputs=2)
    node("Unsqueeze", ["cos", "ax"], ["c"])
    node("Unsqueeze", ["sin", "ax"], ["s"])
    for op, a, b, out in (("Mul", "x1", "c", "x1c"), ("Mul", "x2", "s", "x2s"), ("Sub", "x1c", "x2s", "o1"),
                          ("Mul", "x1", "s", "x1s"), ("Mul", "x2", "c", "x2c"), ("Add", "x1s", "x2c", "o2")):
        node(op, [a, b], [out])  # o1 = x1 cos - x2 sin, o2 = x1 sin + x2 cos
    rot = "rot" if rotary_dim < head_dim else "y"
    if interleaved:
        node("Concat", ["o1", "o2"], ["rq"], axis=-1)
        node("Reshape", ["rq", "flat"], [rot])
    else:
        node("Concat", ["o1", "o2"], [rot], axis=-1)
    if rotary_dim < head_dim:
        node("Concat", [rot, "xp"], ["y"], axis=-1)
    return helper.make_function(
        DOMAIN, "RoPE", ["x", "cos", "sin"], ["y"], n,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["interleaved", "rotary_dim"] + _PLUGIN_ATTRS)


def swiglu_function(*, opset: int = OPSET):
    """The SwiGLU FunctionProto: silu(gate) * up on the two halves of the last axis."""
    from onnx import helper

    nodes = [
        helper.make_node("Split", ["x"], ["gate", "up"], axis=-1, num_outputs=2),
        helper.make_node("Sigmoid", ["gate"], ["sg"]),
        helper.make_node("Mul", ["gate", "sg"], ["silu"]),
        helper.make_node("Mul", ["silu", "up"], ["y"]),
    ]
    return helper.make_function(DOMAIN, "SwiGLU", ["x"], ["y"], nodes,
                                opset_imports=[helper.make_opsetid("", opset)], attributes=_PLUGIN_ATTRS)


def plugin_attrs() -> dict:
    return {"plugin_version": PLUGIN_VERSION, "plugin_namespace": PLUGIN_NAMESPACE}
