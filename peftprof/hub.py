"""`[model] hub = "org/name"`: a model's config.json through huggingface_hub, and nothing else.

Only config.json is ever fetched (never weights, never code). The Hugging Face cache is used as the hub's own
clients use it: HF_HOME / HF_HUB_CACHE choose the directory, HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1) reads
only the cache, HF_ENDPOINT the server, and a token comes from the usual places (HF_TOKEN, `hf auth login`'s
token file) for gated models. They are read at each call, not at import. A config that needs custom code
(auto_map) is refused: no remote code ever runs. Every failure is a `HubError` with a one-line cause.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .families import REGISTRY, hub_rewrite

MAX_CONFIG_BYTES = 4 << 20
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
# architectures a decoder-only causal LM publishes (transformers' *ForCausalLM / *LMHeadModel heads; the
# multimodal wrappers whose language model a family reads, e.g. Gemma3ForConditionalGeneration)
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


class HubError(ValueError):
    """A one-line reason the hub config cannot be used."""


def cache_dir() -> Path:
    """huggingface_hub's cache directory, from the environment as it is now (constants.py: HF_HUB_CACHE, else
    HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expanduser(home)) / "hub"


def offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as huggingface_hub reads them (constants._is_true)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ("1", "ON", "YES", "TRUE")


def _supply_hint(repo_id: str) -> str:
    return (f"download it (`hf download {repo_id} config.json`) or give the file: "
            f"config = \"path/to/config.json\"")


def fetch_config_file(repo_id: str, revision: str | None = None) -> Path:
    """The path of `repo_id`'s config.json in the local Hugging Face cache, downloading that one file first
    unless offline. Raises HubError."""
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        raise HubError(f"{repo_id!r} is not a hub model id (allowed: \"org/name\", e.g. \"Qwen/Qwen3-8B\")")
    if revision is not None and (not isinstance(revision, str) or not revision or len(revision) > 200):
        raise HubError(f"revision {revision!r} must be a branch, tag or commit (a non-empty string)")
    from huggingface_hub import constants as hf_constants
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import hf_hub_download

    where = cache_dir()
    is_offline = offline()
    # huggingface_hub reads HF_HUB_OFFLINE once, at import (constants.py); follow the environment as it is now
    was_offline, hf_constants.HF_HUB_OFFLINE = hf_constants.HF_HUB_OFFLINE, is_offline
    try:
        path = hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=where,
                               local_files_only=is_offline, endpoint=os.environ.get("HF_ENDPOINT") or None)
    except hf_errors.GatedRepoError:
        raise HubError(f"{repo_id} is gated: accept its license on huggingface.co and log in (`hf auth login`, "
                       "or set HF_TOKEN), or " + _supply_hint(repo_id).split(" or ", 1)[1]) from None
    except hf_errors.RepositoryNotFoundError:
        raise HubError(f"no model {repo_id} on the hub (or it is private: log in with `hf auth login` or set "
                       "HF_TOKEN)") from None
    except hf_errors.RevisionNotFoundError:
        raise HubError(f"{repo_id} has no revision {revision!r}") from None
    except hf_errors.LocalEntryNotFoundError:
        at = f" at revision {revision!r}" if revision else ""
        cause = "HF_HUB_OFFLINE is set" if is_offline else "the hub cannot be reached"
        raise HubError(f"{repo_id}{at}: no config.json in the local Hugging Face cache ({where}) and {cause}: "
                       + _supply_hint(repo_id)) from None
    except hf_errors.EntryNotFoundError:
        raise HubError(f"{repo_id} has no config.json (not a transformers model?)") from None
    except hf_errors.HFValidationError as e:
        raise HubError(f"{repo_id!r}: {str(e).splitlines()[0]}") from None
    except (hf_errors.HfHubHTTPError, OSError) as e:
        raise HubError(f"{repo_id}: the hub answered {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
                       + _supply_hint(repo_id)) from None
    finally:
        hf_constants.HF_HUB_OFFLINE = was_offline
    return Path(path)


def read_config(path: Path, name: str) -> dict:
    """A config.json as a dict (size-capped, UTF-8, a JSON object). Raises HubError."""
    try:
        data = path.read_bytes()[: MAX_CONFIG_BYTES + 1]
    except OSError as e:
        raise HubError(f"{name}: cannot read {path}: {e.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise HubError(f"{name}: config.json is over {MAX_CONFIG_BYTES:,} bytes")
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise HubError(f"{name}: config.json is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise HubError(f"{name}: config.json must hold a JSON object")
    return config


def refusal(config: dict) -> str | None:
    """Why a config.json can never be profiled, whatever its model_type (None: no such reason): custom code
    (auto_map: it would need trust_remote_code) for a model_type outside the registry, no model_type, an
    encoder-decoder, or architectures without a causal-LM head (encoder-only) outside the registry. The scenario
    loader reports a model_type outside the registry itself, with the allowed ones. A registry family's config
    that also names custom code (Phi-3 and Phi-3.5 publish auto_map for their configuration_phi3.py and
    modeling_phi3.py) is built from transformers' own classes: nothing of the auto_map runs."""
    model_type = config.get("model_type")
    if "auto_map" in config and not _in_registry(config):
        maps = config["auto_map"]
        shown = ", ".join(f"{k} -> {v}" for k, v in maps.items()) if isinstance(maps, dict) else str(maps)
        return f"needs custom code (auto_map: {shown[:200]}); peftprof never runs remote code"
    if not isinstance(model_type, str) or not model_type:
        return "config.json has no model_type"
    if config.get("is_encoder_decoder"):
        return f"{model_type} is an encoder-decoder model, not a decoder-only causal LM"
    archs = config.get("architectures")
    try:
        rewritten = hub_rewrite(config) if model_type not in REGISTRY else config
    except ValueError as e:
        return str(e)
    if isinstance(archs, list) and archs and rewritten.get("model_type") not in REGISTRY:
        if not any(isinstance(a, str) and a.endswith(_CAUSAL_SUFFIXES) for a in archs):
            return (f"{model_type} is not a decoder-only causal LM (architectures: "
                    f"{', '.join(map(str, archs))[:200]})")
    return None


def _in_registry(config: dict) -> bool:
    try:
        return hub_rewrite(config).get("model_type") in REGISTRY
    except ValueError:
        return False


def causal_lm_problem(config: dict) -> str | None:
    """Why a config.json cannot be profiled as a decoder-only causal LM (None: it can): a `refusal`, or a
    model_type outside the registry that transformers does not build as one (families/generic.py
    type_problem: the one rule the scenario loader also applies)."""
    problem = refusal(config)
    if problem:
        return problem
    if hub_rewrite(config).get("model_type") in REGISTRY:
        return None
    from .families import generic

    return generic.type_problem(config["model_type"])


def hub_config(repo_id: str, revision: str | None = None) -> tuple[dict, Path]:
    """(config in the form a family reads, the cached config.json's path). Raises HubError."""
    path = fetch_config_file(repo_id, revision)
    config = read_config(path, repo_id)
    problem = causal_lm_problem(config)
    if problem:
        raise HubError(f"{repo_id}: {problem}")
    try:
        return hub_rewrite(config), path
    except ValueError as e:
        raise HubError(f"{repo_id}: {e}") from None
