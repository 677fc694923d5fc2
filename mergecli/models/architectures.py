"""The architectures mergecli is tested on end to end, as data (`mergecli archs` prints this table).

Everything the merge needs of an architecture (linear layers, Conv1D orientation, tied parameters,
input groups, the decoder stack, the names its checkpoints store) is read off the model class itself
(see `architecture.py` and `collect.py`), so a model_type outside this table still works, with a
warning that it is untested.
Each row is what those readers find on a tiny instance; `tests/test_architectures.py` rebuilds
every row that way and fails if the table and the classes disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TestedArchitecture:
    model_type: str
    model_class: str
    linear: str  # linear weights of one decoder block
    shared_inputs: str  # groups of linears that read the same input (one Hessian each)
    transposed: str  # weights stored in x out (Conv1D)
    tied_by_default: bool

    def row(self) -> dict[str, object]:
        names = {"model_type": "model_type", "model_class": "class", "linear": "linear weights per block",
                 "shared_inputs": "shared input groups", "transposed": "stored in x out",
                 "tied_by_default": "tied embeddings by default"}
        return {names[k]: v for k, v in asdict(self).items()}


_LLAMA_LINEAR = ("mlp.down_proj, mlp.gate_proj, mlp.up_proj, self_attn.k_proj, self_attn.o_proj, "
                 "self_attn.q_proj, self_attn.v_proj")
_LLAMA_GROUPS = "self_attn.k_proj+self_attn.q_proj+self_attn.v_proj; mlp.gate_proj+mlp.up_proj"

TESTED: tuple[TestedArchitecture, ...] = (
    TestedArchitecture("llama", "LlamaForCausalLM", _LLAMA_LINEAR, _LLAMA_GROUPS, "-", False),
    TestedArchitecture("mistral", "MistralForCausalLM", _LLAMA_LINEAR, _LLAMA_GROUPS, "-", False),
    TestedArchitecture("qwen2", "Qwen2ForCausalLM", _LLAMA_LINEAR, _LLAMA_GROUPS, "-", False),
    TestedArchitecture("phi3", "Phi3ForCausalLM", "mlp.down_proj, mlp.gate_up_proj, self_attn.o_proj, "
                       "self_attn.qkv_proj", "-", "-", False),
    TestedArchitecture("gpt2", "GPT2LMHeadModel", "attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj", "-",
                       "attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj", True),
    TestedArchitecture("bloom", "BloomForCausalLM", "mlp.dense_4h_to_h, mlp.dense_h_to_4h, self_attention.dense, "
                       "self_attention.query_key_value", "-", "-", True),
    TestedArchitecture("gpt_neox", "GPTNeoXForCausalLM", "attention.dense, attention.query_key_value, "
                       "mlp.dense_4h_to_h, mlp.dense_h_to_4h", "-", "-", False),
    TestedArchitecture("mixtral", "MixtralForCausalLM", "block_sparse_moe.experts.*.w1, block_sparse_moe.experts.*.w2, "
                       "block_sparse_moe.experts.*.w3, self_attn.k_proj, self_attn.o_proj, self_attn.q_proj, "
                       "self_attn.v_proj", "self_attn.k_proj+self_attn.q_proj+self_attn.v_proj", "-", False),
    TestedArchitecture("qwen2_moe", "Qwen2MoeForCausalLM", "mlp.experts.*.down_proj, mlp.experts.*.gate_proj, "
                       "mlp.experts.*.up_proj, mlp.shared_expert.down_proj, mlp.shared_expert.gate_proj, "
                       "mlp.shared_expert.up_proj, mlp.shared_expert_gate, self_attn.k_proj, self_attn.o_proj, "
                       "self_attn.q_proj, self_attn.v_proj", "self_attn.k_proj+self_attn.q_proj+self_attn.v_proj; "
                       "mlp.shared_expert.gate_proj+mlp.shared_expert.up_proj+mlp.shared_expert_gate", "-", False),
)
TESTED_TYPES = frozenset(a.model_type for a in TESTED)
