"""`python -m ouroboros generate | demo | bench | info`, the real-pair loader and the real prompts.

Modules, by role: ``entry`` (the parser, ``main`` and the one-line errors), ``args`` (shared flags, their checks, model
sources), ``commands`` (generate, info), ``demo`` (demo, bench), ``timing`` (the timing harness of both), ``pairs``
(the registry of real pairs, the cache, loading), ``gguf`` (GGUF chunk packages: reading, conversion), ``datasets``
(real prompts), ``codeedit`` (the code-editing prompts), ``extras`` (the optional packages), ``smallpair`` (the
small pair built in code).
"""
from ouroboros.cli.datasets import encode_prompt, load_prompts
from ouroboros.cli.entry import main
from ouroboros.cli.pairs import load_pair

__all__ = ["main", "load_pair", "load_prompts", "encode_prompt"]
