"""A small ONNX graph builder that streams weights to an external data file.

Initializers are written to `model.onnx.data` as they are created and only their location is
kept in memory, so the graph of a 65B model is a few MB of protobuf and export memory is
bounded by the largest single tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ALIGN = 4096  # page-aligned tensors let runtimes memory-map them directly
OPSET = 21       # DequantizeLinear block_size / INT4 need 21; TensorRT 10.x and ONNX Runtime parse it
IR_VERSION = 10  # the IR of opset 21; a newer opset (24: TensorScatter) gets the IR that introduced it


class GraphBuilder:
    def __init__(self, data_path: Path, *, opset: int):
        import onnx  # noqa: F401 - fail early with the import error if missing

        self.data_path = Path(data_path)
        self._fh = open(self.data_path, "wb")
        self._offset = 0
        self.opset = opset
        self.nodes, self.initializers, self.inputs, self.outputs = [], [], [], []
        self.functions = {}
        self.domains = {"": opset}
        self._consts: dict[tuple, str] = {}
        self._names: set[str] = set()

    # ---------------------------------------------------------------- tensors
    def weight(self, name: str, array: np.ndarray) -> str:
        """A large initializer, written to the external data file right away."""
        from onnx import helper

        a = np.ascontiguousarray(array)
        return self.weight_raw(name, a.tobytes(), helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)

    def weight_raw(self, name: str, raw: bytes, data_type: int, shape) -> str:
        """An initializer from raw bytes (for types numpy lacks, e.g. packed INT4)."""
        from onnx import TensorProto

        pad = (-self._offset) % ALIGN
        if pad:
            self._fh.write(b"\0" * pad)
            self._offset += pad
        self._fh.write(raw)
        t = TensorProto()
        t.name = name
        t.data_type = data_type
        t.dims.extend(shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data_path.name), ("offset", str(self._offset)), ("length", str(len(raw)))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self._offset += len(raw)
        self.initializers.append(t)
        return name

    def const(self, value, dtype=np.int64, name: str | None = None) -> str:
        """A small constant initializer kept inline (shapes, axes, scalars); deduplicated."""
        from onnx import numpy_helper

        a = np.asarray(value, dtype=dtype)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key in self._consts:
            return self._consts[key]
        name = name or f"/const/{len(self._consts)}"
        self.initializers.append(numpy_helper.from_array(a, name))
        self._consts[key] = name
        return name

    # ---------------------------------------------------------------- graph
    def input(self, name: str, elem_type: int, shape: list):
        from onnx import helper

        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def input_with_default(self, name: str, value, dtype=np.int64) -> str:
        """An input the caller may leave out: an initializer of the same name is its default (not
        deduplicated with const(), since a feed replaces it)."""
        from onnx import helper, numpy_helper

        a = np.asarray(value, dtype=dtype)
        self.initializers.append(numpy_helper.from_array(a, name))
        self.inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape)))
        return name

    def output(self, name: str, elem_type: int, shape: list):
        from onnx import helper

        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def op(self, op_type: str, inputs: list[str], *, name: str, n_out: int = 1, domain: str = "",
           outputs: list[str] | None = None, **attrs):
        """Add a node named `name` (hierarchical, e.g. /model/layers.0/attn/qkv_proj/MatMul).
        Returns its output name, or a list of names when n_out > 1."""
        from onnx import helper

        assert name not in self._names, name
        self._names.add(name)
        outputs = outputs or [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain or None,
                                           **{k: v for k, v in attrs.items() if v is not None}))
        return outputs[0] if len(outputs) == 1 else outputs

    def add_function(self, fn, *, opset: int = 1):
        self.functions[(fn.domain, fn.name)] = fn
        self.domains.setdefault(fn.domain, opset)

    def use_domain(self, domain: str, version: int = 1):
        self.domains.setdefault(domain, version)

    def save(self, model_path: Path, *, producer: str, doc: str = ""):
        import onnx
        from onnx import helper

        self._fh.close()
        graph = helper.make_graph(self.nodes, "llama", self.inputs, self.outputs, self.initializers)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid(d, v) for d, v in self.domains.items()],
            functions=list(self.functions.values()), producer_name=producer, doc_string=doc)
        model.ir_version = max(IR_VERSION, helper.find_min_ir_version_for(list(model.opset_import), True))
        onnx.save(model, str(model_path))
        return model_path
