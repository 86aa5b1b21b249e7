"""ouroboros as a vLLM V1 speculative proposer (SPEC §7): ``speculative_config={"method": "custom_class",
"model": "ouroboros.vllm.OuroborosProposer", "num_speculative_tokens": k}``.

Settings come from ``OUROBOROS_VLLM_*`` environment variables (:mod:`ouroboros.vllm.settings`). Nothing here imports
vllm: ``import ouroboros`` and this package work without it; vLLM imports us.
"""
from ouroboros.vllm.proposer import OuroborosProposer
from ouroboros.vllm.settings import ProposerSettings

__all__ = ["OuroborosProposer", "ProposerSettings"]
