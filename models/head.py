"""Graph surgery on the Ultralytics detection head of an fp32 ONNX: input size, class slimming, decode nodes.

Why: an Ultralytics export is fully convolutional except for three things baked in for one input size (the
anchor grid, the stride row and the anchor count in the DFL reshapes). Rewriting those lets us build any
``--imgsz`` from an fp32 ONNX without torch. Slimming keeps only the classes the edge needs (person), and
``fast_dfl`` moves the DFL softmax to the last axis (onnxruntime is slow on the other).
``dynamic_batch`` lets one run take several frames (several cameras' frames at once: camera/fair_scheduler.py);
``decode_nodes`` names the float-only tail (DFL, box decode, concat of boxes and scores) that must stay
out of quantization: one INT8 scale cannot cover box pixels (0..imgsz) and scores (0..1) at once.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from camera.detector import ModelError

STRIDES = (8, 16, 32)


def make_anchors(imgsz: tuple[int, int], strides: Sequence[int] = STRIDES) -> tuple[np.ndarray, np.ndarray]:
    """Anchor centres ``(2, A)`` and strides ``(A,)`` exactly as Ultralytics' ``make_anchors`` (x fastest)."""
    points, stride_rows = [], []
    for s in strides:
        h, w = imgsz[0] // s, imgsz[1] // s
        sy, sx = np.meshgrid(
            np.arange(h, dtype=np.float32) + 0.5, np.arange(w, dtype=np.float32) + 0.5, indexing="ij"
        )
        points.append(np.stack([sx.ravel(), sy.ravel()]))
        stride_rows.append(np.full(h * w, s, np.float32))
    return np.concatenate(points, axis=1), np.concatenate(stride_rows)


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    """Update or add metadata props (the edge reads ``imgsz`` and ``names`` from them)."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in values.items():
        if key in existing:
            existing[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)


def model_imgsz(model: onnx.ModelProto) -> tuple[int, int]:
    """(h, w) of a model: from ``imgsz`` metadata, else from a static input shape."""
    value = read_metadata(model).get("imgsz")
    if value:
        parsed = ast.literal_eval(value)
        if isinstance(parsed, int):
            return (parsed, parsed)
        return (int(parsed[0]), int(parsed[1]))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) == 4 and dims[2].dim_value and dims[3].dim_value:
        return (dims[2].dim_value, dims[3].dim_value)
    raise ModelError("cannot tell the model's input size (no imgsz metadata, dynamic input)")


def model_names(model: onnx.ModelProto) -> dict[int, str]:
    value = read_metadata(model).get("names")
    if not value:
        raise ModelError("model has no 'names' metadata: not an Ultralytics detection export")
    return {int(k): str(v) for k, v in ast.literal_eval(value).items()}


def check_layout(model: onnx.ModelProto) -> int:
    """Raise ModelError unless the model is a ``1x3xHxW -> 1x(4+nc)xN`` detection graph; return N."""
    graph = model.graph
    meta = read_metadata(model)
    if meta.get("task", "detect") != "detect" or meta.get("end2end", "False") == "True":
        raise ModelError(f"unsupported model layout: task={meta.get('task')} end2end={meta.get('end2end')}")
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise ModelError(
            f"unsupported model layout: {len(graph.input)} inputs / {len(graph.output)} outputs (want 1 / 1)"
        )
    in_dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    out_dims = [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    nc = len(model_names(model))
    if len(in_dims) != 4 or in_dims[1] != 3 or len(out_dims) != 3 or out_dims[1] != 4 + nc:
        raise ModelError(
            f"unsupported model layout: input {in_dims}, output {out_dims}; want 1x3xHxW -> 1x{4 + nc}xN"
        )
    return out_dims[2]


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def retarget(model: onnx.ModelProto, imgsz: tuple[int, int]) -> onnx.ModelProto:
    """Return a copy of ``model`` rebuilt for input size ``imgsz`` (h, w), multiples of 32."""
    if imgsz[0] % 32 or imgsz[1] % 32:
        raise ModelError(f"--imgsz must be a multiple of 32, got {imgsz}")
    old = model_imgsz(model)
    n_old = check_layout(model)
    if tuple(imgsz) == tuple(old):
        return model
    old_points, old_strides = make_anchors(old)
    if old_points.shape[1] != n_old:
        raise ModelError(f"cannot resize this ONNX: {n_old} anchors, not the Ultralytics grid for {old}")
    new_points, new_strides = make_anchors(imgsz)
    n_new = new_points.shape[1]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    replaced = {"anchors": 0, "strides": 0, "shapes": 0}
    for init in graph.initializer:
        dims = tuple(init.dims)
        if n_old not in dims:
            if init.data_type == onnx.TensorProto.INT64 and len(dims) == 1 and dims[0] <= 8:
                arr = numpy_helper.to_array(init)
                if n_old in arr:
                    init.CopyFrom(numpy_helper.from_array(np.where(arr == n_old, n_new, arr), init.name))
                    replaced["shapes"] += 1
            continue
        arr = numpy_helper.to_array(init)
        flat = arr.reshape(-1, n_old)
        if flat.shape[0] == 2 and np.array_equal(flat, old_points):
            new = new_points.reshape(*arr.shape[:-1], n_new).astype(arr.dtype)
            replaced["anchors"] += 1
        elif flat.shape[0] == 1 and np.array_equal(flat[0], old_strides):
            new = new_strides.reshape(*arr.shape[:-1], n_new).astype(arr.dtype)
            replaced["strides"] += 1
        else:
            raise ModelError(f"cannot resize this ONNX: unknown size-bound constant {init.name} {dims}")
        init.CopyFrom(numpy_helper.from_array(new, init.name))
    if not replaced["anchors"] or not replaced["strides"]:
        raise ModelError(
            "cannot resize this ONNX (no Ultralytics anchor grid found): export it from the .pt instead"
        )
    in_dims = graph.input[0].type.tensor_type.shape.dim
    in_dims[2].dim_value, in_dims[3].dim_value = imgsz
    graph.output[0].type.tensor_type.shape.dim[2].dim_value = n_new
    del graph.value_info[:]
    set_metadata(out, {"imgsz": str(list(imgsz))})
    return onnx.shape_inference.infer_shapes(out)


BATCH_DIM = "batch"  # the name of a dynamic batch dimension


def _with_batch(model: onnx.ModelProto, batch: int | str) -> onnx.ModelProto:
    """A copy whose input and output dim 0 is ``batch`` (a size, or the name of a dynamic dimension)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for value in (*out.graph.input, *out.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        if isinstance(batch, int):
            dim.dim_value = batch  # clears dim_param (one of the two)
        else:
            dim.dim_param = batch
    del out.graph.value_info[:]
    return out


def dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy that takes a batch of any size: input and output dim 0 become ``batch``, and the head's
    reshapes, exported with a fixed leading 1, copy their input's batch instead (shape value 0). Per image the
    results are exactly those of the static graph (tests/test_detector_batch.py); at batch 1 it runs as fast.

    >>> import onnx.helper as oh
    >>> g = oh.make_graph([oh.make_node("Reshape", ["x", "s"], ["y"])], "g",
    ...                   [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 2])],
    ...                   [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8])],
    ...                   [numpy_helper.from_array(np.array([1, -1], np.int64), "s")])
    >>> m = dynamic_batch(oh.make_model(g))
    >>> m.graph.input[0].type.tensor_type.shape.dim[0].dim_param, numpy_helper.to_array(m.graph.initializer[0])
    ('batch', array([ 0, -1]))
    >>> fixed_batch(m).graph.input[0].type.tensor_type.shape.dim[0].dim_value
    1
    """
    out = _with_batch(model, BATCH_DIM)
    inits = {i.name: i for i in out.graph.initializer}
    for node in out.graph.node:
        if node.op_type != "Reshape":
            continue
        shape = inits.get(node.input[1])
        if shape is None:
            raise ModelError(f"cannot make the batch dynamic: reshape {node.name} has a computed shape")
        arr = numpy_helper.to_array(shape)
        if arr.size and arr[0] == 1:
            arr = arr.copy()
            arr[0] = 0  # "copy dim 0 from the input": the batch
            shape.CopyFrom(numpy_helper.from_array(arr, shape.name))
    return onnx.shape_inference.infer_shapes(out)


def fixed_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return ``model`` with a batch of 1 where its batch is dynamic (an export with ``dynamic=True``, or our own
    fp32 twin): quantization's shape inference needs it fixed. Reshapes that copy the batch (0) still work."""
    dims = [v.type.tensor_type.shape.dim[0] for v in (*model.graph.input, *model.graph.output)]
    if all(d.HasField("dim_value") for d in dims):
        return model
    return onnx.shape_inference.infer_shapes(_with_batch(model, 1))


def slim_classes(model: onnx.ModelProto, keep: Sequence[str]) -> onnx.ModelProto:
    """Return a copy whose head scores only the ``keep`` classes (renumbered from 0 in that order)."""
    names = model_names(model)
    by_name = {v: k for k, v in names.items()}
    missing = [c for c in keep if c not in by_name]
    if missing:
        raise ModelError(f"model has no class {missing[0]!r}")
    ids = [by_name[c] for c in keep]
    nc = len(names)
    check_layout(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    prod = _producers(graph)
    inits = {i.name: i for i in graph.initializer}
    final = prod[graph.output[0].name]
    if final.op_type != "Concat":
        raise ModelError("cannot slim this head: output is not a Concat of boxes and scores")
    # scores input: Sigmoid <- Concat <- Reshape(conv, [1, nc, -1]) per level
    score_node = prod[final.input[1]]
    while score_node.op_type == "Sigmoid" or (score_node.op_type == "Concat" and len(score_node.input) == 1):
        score_node = prod[score_node.input[0]]
    if score_node.op_type != "Concat":
        raise ModelError("cannot slim this head: unexpected score branch")
    shape_name = f"slim_shape_{len(ids)}"
    graph.initializer.append(numpy_helper.from_array(np.array([1, len(ids), -1], np.int64), shape_name))
    for level_out in score_node.input:
        reshape = prod[level_out]
        conv = prod[reshape.input[0]]
        if reshape.op_type != "Reshape" or conv.op_type != "Conv":
            raise ModelError("cannot slim this head: score levels are not Conv -> Reshape")
        for name in conv.input[1:]:
            arr = numpy_helper.to_array(inits[name])
            if arr.shape[0] != nc:
                raise ModelError(f"cannot slim this head: {name} has {arr.shape[0]} rows, not {nc}")
            inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr[ids]), name))
        reshape.input[1] = shape_name
    graph.output[0].type.tensor_type.shape.dim[1].dim_value = 4 + len(ids)
    del graph.value_info[:]
    set_metadata(out, {"names": repr(dict(enumerate(keep)))})
    return onnx.shape_inference.infer_shapes(out)


def decode_nodes(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Names of the float-only decode tail, and of the head's last Conv layers that feed it.

    Walks back from the output through every node; stops at Conv layers (the box and class branches) except
    the DFL's fixed Conv, which follows a Softmax and belongs to the decode.
    """
    graph = model.graph
    prod = _producers(graph)
    decode, branch_convs, seen = [], [], set()
    stack = [graph.output[0].name]
    while stack:
        node = prod.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type == "Conv":
            src = prod.get(node.input[0])
            if src is None or src.op_type != "Softmax":
                branch_convs.append(node.name)
                continue
        decode.append(node.name)
        stack.extend(node.input)
    if not decode:
        raise ModelError("cannot find the detection head's decode nodes")
    return decode, branch_convs


def fast_dfl(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy whose DFL softmax runs over the last axis; numerically the same head, 1.2x faster.

    Why: the export computes the DFL as ``Reshape(1,4,16,N) -> Transpose(0,2,1,3) -> Softmax(axis=1) ->
    Conv(16->1, weights 0..15)``. onnxruntime's CPU softmax over a non-last axis transposes internally and was
    the second most expensive op of the whole INT8 model (16 % of the time at 384x640). Transposing to
    ``(1,4,N,16)``, a last-axis Softmax and a ``MatMul`` with the same 16 weights compute exactly the same
    expectation. A model without that pattern (already rewritten, another head) is returned unchanged.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    prod = _producers(graph)
    inits = {i.name: i for i in graph.initializer}
    for conv in list(graph.node):
        if conv.op_type != "Conv" or len(conv.input) != 2 or conv.input[1] not in inits:
            continue
        softmax = prod.get(conv.input[0])
        transpose = prod.get(softmax.input[0]) if softmax is not None and softmax.op_type == "Softmax" else None
        if transpose is None or transpose.op_type != "Transpose":
            continue
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
        axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
        weight = numpy_helper.to_array(inits[conv.input[1]])
        if perm != [0, 2, 1, 3] or axis != 1 or weight.ndim != 4 or weight.shape[0] != 1:
            continue
        users = [n for n in graph.node if softmax.output[0] in n.input or transpose.output[0] in n.input]
        if len(users) != 2:  # the transpose and softmax outputs must feed only this chain
            continue
        proj = f"{conv.name or 'dfl'}_proj"
        graph.initializer.append(numpy_helper.from_array(weight.reshape(-1, 1).astype(np.float32), proj))
        for a in transpose.attribute:
            if a.name == "perm":
                a.ints[:] = [0, 1, 3, 2]
        for a in softmax.attribute:
            if a.name == "axis":
                a.i = -1
        matmul = onnx.helper.make_node("MatMul", [softmax.output[0], proj], list(conv.output),
                                       name=f"{conv.name}_matmul" if conv.name else "")
        index = list(graph.node).index(conv)
        graph.node.remove(conv)
        graph.node.insert(index, matmul)
        if not any(conv.input[1] in n.input for n in graph.node):
            graph.initializer.remove(inits[conv.input[1]])
        # The MatMul's (1,4,N,1) feeds the export's Reshape to (1,4,N) just like the Conv's (1,1,4,N) did.
        del graph.value_info[:]
        return onnx.shape_inference.infer_shapes(out)
    return model
