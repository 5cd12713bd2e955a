"""Bring the 2018 tutorial's trained CNTK models into the PyTorch `seed` network.

The decoded graph (`cntk_proto`) is walked along its data flow, from the centred input through
the encoder (convolution -> batch norm -> ReLU chains, a new level at each stride-2
convolution), then up the decoder (transposed convolution -> 1 x 1 convolution -> sums with
the skip and input convolutions -> ReLU) to the head. Each CNTK block found there is given
its PyTorch module, and every tensor is copied with its layout converted:

- convolution kernels: CNTK's shape (kW, kH, in, out), stored fastest-first, is NumPy's
  (out, in, kH, kW), which is PyTorch's Conv2d layout; transposed convolution kernels are
  (in, out, kH, kW) in both; biases (1, 1, C) become (C,);
- batch norm: scale, bias, aggregate mean and variance -> weight, bias, running_mean,
  running_var (epsilon 1e-5 in both); the aggregate sample count -> num_batches_tracked.

Anything unexpected (a block the walk does not reach, a parameter left over, a PyTorch tensor
left unfilled, a shape that disagrees) stops the import with a message naming it: a half
mapped model must never be used.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from landcover.artifacts.cntk_proto import NDArray, read_model_dictionary
from landcover.errors import LandcoverError
from landcover.models.seed import SeedNet

PARAMETER, CONSTANT = 2, 3
RELU, PLUS, SPLICE, REDUCE = 3, 19, 43, 39


class CntkImportError(LandcoverError):
    """The CNTK graph does not map onto the seed network, tensor for tensor."""


@dataclass
class Block:
    """One CNTK block (a layer): its kind, data input and parameters by CNTK name."""

    uid: str
    kind: str  # Convolution | ConvolutionTranspose | BatchNormalization
    data_input: str
    params: dict[str, tuple[str, NDArray]] = field(default_factory=dict)
    stride: int = 1
    ends_with_relu: bool = False


def _producer(name: str) -> str:
    return name.rsplit("_Output_", 1)[0]


class CntkGraph:
    """The outer graph of a saved CNTK function: blocks and the glue between them."""

    def __init__(self, dictionary: dict[str, Any], source: str) -> None:
        self.source = source
        self.variables = {v["uid"]: v for v in dictionary["inputs"]}
        self.functions = {f["uid"]: f for f in dictionary["primitive_functions"]}
        self.root = dictionary["root"]
        self.outer = self._reachable(self.root)
        self.consumers: dict[str, list[str]] = defaultdict(list)
        for uid in self.outer:
            for name in self.data_inputs(uid):
                self.consumers[_producer(name)].append(uid)
        self.blocks = {uid: self._block(uid) for uid in self.outer if self.is_block(uid)}

    def _reachable(self, root: str) -> list[str]:
        seen: list[str] = []
        stack = [root]
        while stack:
            uid = stack.pop()
            if uid in seen or uid not in self.functions:
                continue
            seen.append(uid)
            stack += [_producer(name) for name in self.functions[uid]["inputs"]]
        return seen

    def is_block(self, uid: str) -> bool:
        """Whether a node is a block (CNTK's layer wrapper) rather than a primitive op."""
        return "block_function_op_name" in self.functions.get(uid, {})

    def op(self, uid: str) -> int:
        """A node's primitive op code (what the walk matches the 2018 network's layers on)."""
        return int(self.functions[uid]["op"])

    def data_inputs(self, uid: str) -> list[str]:
        """A node's inputs that are data (not parameters)."""
        return [
            name
            for name in self.functions[uid]["inputs"]
            if self.variables.get(name, {}).get("kind") not in (PARAMETER, CONSTANT)
        ]

    def _block(self, uid: str) -> Block:
        function = self.functions[uid]
        (data_input,) = self.data_inputs(uid) or [""]
        block = Block(uid, function["block_function_op_name"], _producer(data_input))
        for name in function["inputs"]:
            variable = self.variables.get(name, {})
            if variable.get("kind") in (PARAMETER, CONSTANT):
                block.params[variable.get("name", name)] = (name, variable["value"])
        inner_root = function["block_function_composite"]["root"]
        block.ends_with_relu = self.functions[inner_root]["op"] == RELU
        if block.kind.startswith("Convolution"):
            kernel_uid = block.params["W"][0]
            for inner in self.functions.values():
                if inner.get("op") == 33 and kernel_uid in inner["inputs"]:
                    block.stride = int(inner["attributes"]["strides"][0])
        return block

    def next_of(self, uid: str, *, kind: str | None = None, op: int | None = None) -> list[str]:
        """The nodes fed by `uid`, optionally only those of a kind or op: the walk's step."""
        out = []
        for consumer in self.consumers.get(uid, []):
            if (
                kind is not None
                and self.blocks.get(consumer, Block("", "", "")).kind == kind
                or op is not None
                and not self.is_block(consumer)
                and self.op(consumer) == op
            ):
                out.append(consumer)
        return out

    def error(self, message: str) -> CntkImportError:
        """A CntkImportError that names the file: the graph is not the network we know."""
        return CntkImportError(f"{self.source}: {message}")


@dataclass
class SeedLayout:
    """The blocks of the tutorial network in the roles the PyTorch modules play."""

    input_node: str
    encoder: list[tuple[Block, Block]]  # (convolution, batch norm), in data-flow order
    levels: list[int]  # encoder level of each pair
    upsample: list[Block]
    from_up: list[Block]
    from_skip: list[Block]
    from_input: Block
    head: Block


def _sum_terms(graph: CntkGraph, terms: list[str]) -> list[str]:
    """The blocks added together, looking through nested sums (a + b) + c."""
    leaves = []
    for term in terms:
        if not graph.is_block(term) and term in graph.functions and graph.op(term) == PLUS:
            leaves += _sum_terms(graph, [_producer(n) for n in graph.data_inputs(term)])
        else:
            leaves.append(term)
    return leaves


def trace_seed_layout(graph: CntkGraph) -> SeedLayout:
    """Walk the data flow; fail on anything the seed network does not have."""
    splices = [
        uid
        for uid in graph.outer
        if not graph.is_block(uid)
        and graph.op(uid) == SPLICE
        and graph.next_of(uid, kind="Convolution")
    ]
    if len(splices) != 1:
        raise graph.error(f"expected one centred input feeding convolutions, found {splices}")
    input_node = splices[0]
    means = [
        uid
        for uid in graph.outer
        if not graph.is_block(uid)
        and graph.op(uid) == REDUCE
        and graph.functions[uid]["attributes"].get("reductionOpName") == "Mean"
    ]
    if len(means) != 3:
        raise graph.error(f"expected per-patch means of R, G, B, found {len(means)} means")
    first = graph.next_of(input_node, kind="Convolution")
    with_bias = [graph.blocks[u] for u in first if "b" in graph.blocks[u].params]
    without = [graph.blocks[u] for u in first if "b" not in graph.blocks[u].params]
    if len(with_bias) != 1 or len(without) != 1:
        raise graph.error("the input should feed one encoder and one skip convolution")
    from_input, conv = with_bias[0], without[0]

    encoder: list[tuple[Block, Block]] = []
    levels: list[int] = []
    level_outputs: dict[str, int] = {}
    level = 0
    while True:
        if conv.stride == 2:
            level += 1
        bn_uid = _only(graph.next_of(conv.uid, kind="BatchNormalization"))
        if bn_uid is None:
            raise graph.error(f"convolution {conv.uid} is not followed by a batch norm")
        encoder.append((conv, graph.blocks[bn_uid]))
        levels.append(level)
        out = bn_uid
        relus = graph.next_of(bn_uid, op=RELU)
        if relus:
            out = relus[0]
        level_outputs[out] = level
        following = [
            graph.blocks[u]
            for u in graph.next_of(out, kind="Convolution")
            if "b" not in graph.blocks[u].params
        ]
        if following:
            conv = following[0]
            continue
        bottom = graph.next_of(out, kind="ConvolutionTranspose")
        if len(bottom) != 1:
            raise graph.error(f"the encoder ends at {out} without a transposed convolution")
        break

    upsample, from_up, from_skip = [], [], []
    node = bottom[0]
    head = None
    for step in range(3):
        up = graph.blocks[node]
        upsample.append(up)
        up_conv = _only(graph.next_of(up.uid, kind="Convolution"))
        if up_conv is None:
            raise graph.error(f"transposed convolution {up.uid} is not followed by a 1 x 1 conv")
        from_up.append(graph.blocks[up_conv])
        terms, node = [], up_conv
        while not graph.next_of(node, op=RELU):
            plus = _only(graph.next_of(node, op=PLUS))
            if plus is None:
                raise graph.error(f"{node} does not lead to a sum and a ReLU")
            terms += _sum_terms(
                graph, [_producer(n) for n in graph.data_inputs(plus) if _producer(n) != node]
            )
            node = plus
        (relu,) = graph.next_of(node, op=RELU)
        skips = [
            graph.blocks[t]
            for t in terms
            if t in graph.blocks and graph.blocks[t].data_input in level_outputs
        ]
        if len(skips) != 1 or level_outputs[skips[0].data_input] != 2 - step:
            raise graph.error(f"decoder step {step} should merge encoder level {2 - step}")
        from_skip.append(skips[0])
        if step == 2 and from_input.uid not in terms:
            raise graph.error("the input convolution should join the full-resolution sum")
        if step < 2:
            upsampling = _only(graph.next_of(relu, kind="ConvolutionTranspose"))
            if upsampling is None:
                raise graph.error(f"decoder step {step} is not followed by an upsampling")
            node = upsampling
        else:
            head_uid = _only(graph.next_of(relu, kind="Convolution"))
            head = graph.blocks.get(head_uid) if head_uid else None
    if head is None or not head.ends_with_relu:
        raise graph.error("the network should end with a 3 x 3 convolution and a ReLU")
    return SeedLayout(input_node, encoder, levels, upsample, from_up, from_skip, from_input, head)


def _conv(prefix: str, block: Block) -> Iterable[tuple[str, str, np.ndarray]]:
    yield f"{prefix}.weight", block.params["W"][0], block.params["W"][1].array
    if "b" in block.params:
        yield f"{prefix}.bias", block.params["b"][0], block.params["b"][1].array.reshape(-1)


def _batch_norm(prefix: str, block: Block) -> Iterable[tuple[str, str, np.ndarray]]:
    names = {
        "scale": "weight",
        "bias": "bias",
        "aggregate_mean": "running_mean",
        "aggregate_variance": "running_var",
        "aggregate_count": "num_batches_tracked",
    }
    for cntk_name, torch_name in names.items():
        if cntk_name not in block.params:
            raise CntkImportError(f"batch norm {block.uid} has no {cntk_name}")
        uid, value = block.params[cntk_name]
        yield f"{prefix}.{torch_name}", uid, value.array.reshape(-1)


def _only(uids: list[str]) -> str | None:
    """The one node a walk through the graph expects next (None: the walk ends here)."""
    if len(uids) > 1:
        raise CntkImportError(f"the graph branches where the 2018 network does not: {uids}")
    return uids[0] if uids else None


def seed_state_dict(layout: SeedLayout, net: SeedNet) -> tuple[dict[str, torch.Tensor], dict]:
    """PyTorch tensors for every entry of `net.state_dict()`, and the name mapping."""
    pairs: list[tuple[str, str, np.ndarray]] = []
    position = 0
    for level_index, level in enumerate(net.encoder):
        for step_index, _ in enumerate(level.children()):
            if position >= len(layout.encoder) or layout.levels[position] != level_index:
                raise CntkImportError(
                    f"encoder level {level_index} has a different number of convolutions "
                    f"in the CNTK graph (levels {layout.levels})"
                )
            conv, bn = layout.encoder[position]
            expected_stride = cast(Any, net.encoder)[level_index][step_index][0].stride[0]
            if conv.stride != expected_stride:
                raise CntkImportError(
                    f"{conv.uid}: stride {conv.stride}, seed has {expected_stride}"
                )
            pairs += _conv(f"encoder.{level_index}.{step_index}.0", conv)
            pairs += _batch_norm(f"encoder.{level_index}.{step_index}.1", bn)
            position += 1
    if position != len(layout.encoder):
        raise CntkImportError(f"{len(layout.encoder) - position} encoder layers left over")
    for step in range(3):
        pairs += _conv(f"upsample.{step}", layout.upsample[step])
        pairs += _conv(f"from_up.{step}", layout.from_up[step])
        pairs += _conv(f"from_skip.{step}", layout.from_skip[step])
    pairs += _conv("from_input", layout.from_input)
    pairs += _conv("head", layout.head)

    target = net.state_dict()
    state: dict[str, torch.Tensor] = {}
    mapping: dict[str, str] = {}
    for torch_name, cntk_uid, array in pairs:
        if torch_name not in target:
            raise CntkImportError(f"no PyTorch tensor {torch_name} for CNTK {cntk_uid}")
        expected = tuple(target[torch_name].shape)
        if torch_name.endswith("num_batches_tracked"):
            state[torch_name] = torch.tensor(int(array.item()), dtype=torch.long)
        else:
            if tuple(array.shape) != expected:
                raise CntkImportError(
                    f"CNTK {cntk_uid} has shape {tuple(array.shape)}, PyTorch {torch_name} "
                    f"expects {expected}"
                )
            state[torch_name] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        mapping[torch_name] = cntk_uid
    unfilled = sorted(set(target) - set(state))
    if unfilled:
        raise CntkImportError(f"PyTorch tensors left without a CNTK value: {unfilled}")
    return state, mapping


@dataclass
class ImportedModel:
    """The rebuilt network, where each CNTK tensor went, and counts for the log."""

    net: SeedNet
    mapping: dict[str, str]  # PyTorch name -> CNTK uid
    cntk_tensors: int
    parameters: int


def import_cntk_seed(path: Path) -> ImportedModel:
    """Decode a tutorial `.model` file and load every tensor into a new `SeedNet`."""
    path = Path(path)
    if not path.is_file():
        raise CntkImportError(f"{path}: file does not exist")
    dictionary = read_model_dictionary(path)
    try:
        return seed_from_dictionary(dictionary, str(path))
    except CntkImportError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as err:
        # a decodable file whose graph is not the tutorial's (or is crafted): one line
        raise CntkImportError(
            f"{path}: not the tutorial's seed network ({type(err).__name__}: {err})"
        ) from err


def seed_from_dictionary(dictionary: dict[str, Any], source: str) -> ImportedModel:
    """The 2018 network rebuilt in PyTorch from a decoded CNTK model dictionary."""
    graph = CntkGraph(dictionary, source)
    layout = trace_seed_layout(graph)
    stored = {uid for uid, v in graph.variables.items() if v.get("kind") in (PARAMETER, CONSTANT)}
    num_classes = layout.head.params["W"][1].array.shape[0]
    in_channels = layout.from_input.params["W"][1].array.shape[1]
    net = SeedNet(in_channels, num_classes)
    try:
        state, mapping = seed_state_dict(layout, net)
    except CntkImportError as err:
        raise CntkImportError(f"{source}: {err}") from err
    left_over = sorted(stored - set(mapping.values()))
    if left_over:
        names = [f"{uid} ({graph.variables[uid].get('name')})" for uid in left_over]
        raise CntkImportError(f"{source}: CNTK tensors not mapped to the seed network: {names}")
    net.load_state_dict(state, strict=True)
    parameters = sum(p.numel() for p in net.parameters())
    return ImportedModel(net.eval(), mapping, len(stored), parameters)
