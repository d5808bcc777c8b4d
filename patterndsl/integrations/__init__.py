"""Bridges to other libraries: `hf` plugs compiled patterns into Hugging Face transformers' attention
interface (and `hf_cache` into its KV cache), `hf_config` reads a transformers config's attention as a
`.pat` model. Each imports its library only when used, so patterndsl installs without them."""
