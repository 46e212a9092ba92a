"""`_target_` entries: what a config may instantiate, decided by what the named object *is*.

A config names a class by a dotted path. Hydra resolves such a path by walking attributes, so a path
that starts with an allowed prefix can still reach anything the allowed modules import
(`torch.nn.parallel.distributed.os.system`, `trainctl.checkpoint.shutil.copy`). Here a path is
resolved step by step, importing only modules under an allowed prefix, and every step must be what
its spelling says: the longest importable module of the path, then attributes that are classes. The
object reached must be a class of the expected kind (an ``nn.Module`` subclass for models) whose
defining module is under an allowed prefix. Objects are built here, recursively, never by
``hydra.utils.instantiate``: a nested `_target_` is checked the same way before anything is called.

Configs, recipes and checkpoints are untrusted input: `allowed_target_prefixes` in a crafted file may
name any module, which is why the kind check, not the prefix, is what keeps code from running.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import re
import sys
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple

from trainctl.errors import ConfigError, check, suggestion

BUILTIN_PREFIXES = ("trainctl.", "torch.nn.")
"""Modules a `_target_` may always come from; `allowed_target_prefixes` adds the user's own."""
SPECIAL_KEYS = ("_target_", "_args_", "_partial_")
"""Keys of a `_target_` node that are not constructor arguments (`_partial_` only below the top)."""
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def normalize_prefixes(prefixes: Sequence[str], key: str = "allowed_target_prefixes") -> Tuple[str, ...]:
    """Each prefix as a dotted module path ending in a dot (`mynets` and `mynets.` both mean the package
    `mynets` and its submodules); anything else, such as an empty prefix that would allow every module,
    is refused."""
    out = []
    for prefix in prefixes:
        text = str(prefix)
        check(bool(_DOTTED.match(text.rstrip("."))) and not text.endswith(".."), key,
              f"'{text}' is not a module prefix (dotted Python names, e.g. my_package. or my_package.models.)",
              f"set {key}=[my_package.]")
        out.append(text.rstrip(".") + ".")
    return BUILTIN_PREFIXES + tuple(out)


def _under(name: str, prefixes: Sequence[str]) -> bool:
    """Whether the module (or object path) ``name`` is one of ``prefixes`` or lies below one."""
    return any((name + ".").startswith(p) for p in prefixes)


def check_path(target: Any, key: str, prefixes: Sequence[str]) -> None:
    """Torch-free checks of a `_target_` string: a dotted Python path under an allowed prefix."""
    check(isinstance(target, str) and target not in ("", "???"), key,
          "needs the import path of a class", f"set {key}=my_package.MyNet")
    check(bool(_DOTTED.match(target)), key, f"'{target}' is not a dotted Python path",
          f"set {key}=my_package.MyNet")
    if not _under(target.rsplit(".", 1)[0], prefixes):
        module = target.rsplit(".", 1)[0]
        raise ConfigError(key, f"'{target}' is not under an allowed module prefix ({', '.join(prefixes)})",
                          f"if you trust it, allow it with allowed_target_prefixes=[{module}.]")


def target_nodes(node: Any, key: str) -> Iterator[Tuple[str, Any]]:
    """(key, node) of every mapping holding a `_target_`, below and including ``node``."""
    if isinstance(node, Mapping):
        if "_target_" in node:
            yield key, node
        for k, v in node.items():
            if k != "_target_":
                yield from target_nodes(v, f"{key}.{k}")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from target_nodes(v, f"{key}[{i}]")


def check_paths(node: Mapping, key: str, prefixes: Sequence[str]) -> None:
    """Torch-free checks of every `_target_` in a config node and of the special keys beside them."""
    for path, target_node in target_nodes(node, key):
        check_path(target_node["_target_"], f"{path}._target_", prefixes)
        for special in (k for k in target_node if isinstance(k, str) and k.startswith("_") and k.endswith("_")):
            check(special in SPECIAL_KEYS and (special != "_partial_" or path != key), f"{path}.{special}",
                  f"'{special}' is not supported here (supported: _target_, _args_, and _partial_ below the top)",
                  f"remove it (~{path}.{special})")


# --- resolving ---------------------------------------------------------------------------------------

def _find_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError, AttributeError):  # a parent is not a package, or not importable
        return False


def _kind_name(kind: type) -> str:
    return "torch.nn.Module" if kind.__module__.startswith("torch.nn") and kind.__name__ == "Module" else \
        f"{kind.__module__}.{kind.__qualname__}"


def resolve(target: str, key: str, prefixes: Sequence[str], kind: type, base_dir: Optional[str] = None) -> type:
    """The class ``target`` names, checked to be a subclass of ``kind`` defined under ``prefixes``.

    Only modules whose own path is under an allowed prefix are imported; the remaining parts of the
    path must be attributes that are classes (nested classes), never modules reached through another
    module's imports.
    """
    check_path(target, key, prefixes)
    if base_dir is not None and base_dir not in sys.path:
        sys.path.insert(0, base_dir)  # the user's own modules, as `python -m` would find them
    parts = target.split(".")
    module = None
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        if not _under(name, prefixes):
            break
        if _find_module(name):
            try:
                module = importlib.import_module(name)
            except Exception as exc:  # the user's module failed while importing: say so, no traceback
                raise ConfigError(key, f"importing the module '{name}' failed: {type(exc).__name__}: {exc}",
                                  "fix that module, or check the module path") from None
            break
    if module is None:
        raise ConfigError(key, f"cannot import '{target}': no module of that path can be found",
                          "check the module path and that it is importable from this directory")
    if cut == len(parts):
        raise ConfigError(key, f"'{target}' is a module, not a class", f"set {key} to the path of a class in it")
    obj: Any = module
    walked = module.__name__
    for part in parts[cut:]:
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ConfigError(key, f"cannot import '{target}': '{walked}' has no attribute '{part}'."
                              f"{suggestion(part, names)}", "check the spelling of the class name")
        obj = getattr(obj, part)
        walked = f"{walked}.{part}"
        if not inspect.isclass(obj):
            what = f"the module '{obj.__name__}'" if inspect.ismodule(obj) else f"a {type(obj).__name__}"
            raise ConfigError(key, f"'{walked}' is {what}, not a class: a _target_ must name a class where "
                              "its module defines or exports it", f"set {key} to the path of a {_kind_name(kind)} class")
    home = getattr(obj, "__module__", "") or ""
    if not _under(home, prefixes):
        raise ConfigError(key, f"'{target}' is defined in '{home}', which is not under an allowed module prefix "
                          f"({', '.join(prefixes)})", f"if you trust it, allow it with allowed_target_prefixes=[{home}.]")
    if not issubclass(obj, kind):
        raise ConfigError(key, f"'{target}' is a class but not a {_kind_name(kind)} subclass, so it cannot be "
                          "built here", f"set {key} to the path of a {_kind_name(kind)} class")
    return obj


FACTORY_MARK = "__trainctl_dataset_factory__"
"""Set by :func:`trainctl.datasets.dataset_factory` on the functions a config may call."""


def resolve_factory(target: str, key: str, user_prefixes: Sequence[str], kind: type,
                    base_dir: Optional[str] = None) -> Any:
    """A data factory: a subclass of ``kind`` (a torch Dataset), or a function marked with
    :func:`trainctl.datasets.dataset_factory`, defined under one of the user's prefixes (trainctl's and
    torch's own modules are not: their functions write files). Marking is what lets a function through:
    a path that reaches ``os.system`` or any other function is refused, whatever the prefixes say."""
    prefixes = normalize_prefixes(user_prefixes, "allowed_target_prefixes")[len(BUILTIN_PREFIXES):]
    if not prefixes:
        module = target.rsplit(".", 1)[0] if isinstance(target, str) else "my_data"
        raise ConfigError(key, "a dataset factory must come from a module you allow",
                          f"allow it with allowed_target_prefixes=[{module}.]")
    check_path(target, key, prefixes)
    module_name, _, attr = target.rpartition(".")
    if base_dir is not None and base_dir not in sys.path:
        sys.path.insert(0, base_dir)
    if not _find_module(module_name):  # a module of its own, not one reached through another's imports
        raise ConfigError(key, f"cannot import '{target}': no module '{module_name}' can be found",
                          "name a class or function of a module importable from this directory")
    try:
        owner = importlib.import_module(module_name)
    except Exception as exc:  # the user's module failed while importing
        raise ConfigError(key, f"importing the module '{module_name}' failed: {type(exc).__name__}: {exc}",
                          "fix that module, or check the module path") from None
    obj = getattr(owner, attr, None)
    if obj is None:
        names = [n for n in dir(owner) if not n.startswith("_")]
        raise ConfigError(key, f"'{module_name}' has no attribute '{attr}'.{suggestion(attr, names)}",
                          "check the spelling")
    home = getattr(obj, "__module__", "") or ""
    if not _under(home, prefixes):
        raise ConfigError(key, f"'{target}' is defined in '{home}', which is not under an allowed module prefix "
                          f"({', '.join(prefixes)})", f"if you trust it, allow it with allowed_target_prefixes=[{home}.]")
    if inspect.isclass(obj) and issubclass(obj, kind):
        return obj
    if inspect.isfunction(obj) and getattr(obj, FACTORY_MARK, False):
        return obj
    raise ConfigError(key, f"'{target}' is neither a torch Dataset class nor a function marked with "
                      "@trainctl.datasets.dataset_factory", "decorate the function that builds your datasets "
                      "with @dataset_factory (from trainctl.datasets import dataset_factory)")


# --- building ----------------------------------------------------------------------------------------

def _plain(node: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def signature_of(cls: type) -> Tuple[Dict[str, inspect.Parameter], bool]:
    """(named parameters of the constructor, whether it takes **kwargs)."""
    try:
        params = dict(inspect.signature(cls).parameters)
    except (TypeError, ValueError):  # a builtin without a signature: let the call report problems
        return {}, True
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return params, takes_any


def build(node: Mapping, key: str, prefixes: Sequence[str], kind: type, base_dir: Optional[str] = None,
          extras: Optional[Dict[str, Any]] = None) -> Any:
    """Build the object a `_target_` node describes: its class resolved and checked, nested `_target_`
    nodes built first (checked the same way), then the class called with the node's arguments plus
    ``extras`` (top level only; arguments the node sets win)."""
    node = _plain(node)
    check_paths(node, key, prefixes)
    for path, target_node in target_nodes(node, key):  # every class is known to be safe before any is called
        resolve(target_node["_target_"], f"{path}._target_", prefixes, kind, base_dir)
    return _build(node, key, prefixes, kind, base_dir, extras or {}, top=True)


def _build(node: Dict[str, Any], key: str, prefixes: Sequence[str], kind: type, base_dir: Optional[str],
           extras: Dict[str, Any], top: bool) -> Any:
    cls = resolve(node["_target_"], f"{key}._target_", prefixes, kind, base_dir)
    params, takes_any = signature_of(cls)
    given = {k: v for k, v in node.items() if k not in SPECIAL_KEYS}
    for name in sorted(given):
        if not takes_any and name not in params:
            raise ConfigError(f"{key}.{name}", f"{node['_target_']} takes no argument '{name}'."
                              f"{suggestion(name, params)}", f"remove it (~{key}.{name}) or use one of: "
                              f"{', '.join(params)}")
    kwargs = {k: _value(v, f"{key}.{k}", prefixes, kind, base_dir) for k, v in given.items()}
    kwargs.update({k: v for k, v in extras.items() if k in params and k not in given})
    args = [_value(v, f"{key}._args_[{i}]", prefixes, kind, base_dir) for i, v in enumerate(node.get("_args_") or [])]
    if node.get("_partial_") and not top:
        return functools.partial(cls, *args, **kwargs)
    try:
        return cls(*args, **kwargs)
    except Exception as exc:  # the constructor refused its arguments
        raise ConfigError(key, f"{node['_target_']}(...) failed: {type(exc).__name__}: {exc}",
                          f"check the arguments under {key}") from None


def _value(value: Any, key: str, prefixes: Sequence[str], kind: type, base_dir: Optional[str]) -> Any:
    if isinstance(value, dict) and "_target_" in value:
        return _build(value, key, prefixes, kind, base_dir, {}, top=False)
    if isinstance(value, dict):
        return {k: _value(v, f"{key}.{k}", prefixes, kind, base_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_value(v, f"{key}[{i}]", prefixes, kind, base_dir) for i, v in enumerate(value)]
    return value

