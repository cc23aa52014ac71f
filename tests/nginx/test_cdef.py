"""The ffi.cdef of openresty/lib/resty/llmproxy.lua must match include/llmproxy.h.

LuaJIT accepts any declaration it is given and trusts it: a drifted prototype is a silent ABI
break (wrong argument widths, wrong struct offsets). Two independent checks:
  1. normalised declarations: every typedef and prototype of the cdef equals the header's
     (parameter names ignored), and every function of the header is bound or listed on an
     `-- unbound:` line of the Lua file;
  2. the C compiler: the cdef's prototypes are compiled after the header (conflicting types are
     an error) and its structs/enums, renamed, are compared member by member with
     _Static_assert on sizeof/offsetof/values.
The checker itself is tested against deliberately drifted copies of the cdef.
"""

import re
import shutil
import subprocess

import pytest

from harness import ROOT

HEADER = ROOT / "include" / "llmproxy.h"
LUA = ROOT / "openresty" / "lib" / "resty" / "llmproxy.lua"
CC = shutil.which("cc") or shutil.which("gcc")


def strip_c(text):
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    text = "\n".join(l for l in text.splitlines() if not l.strip().startswith("#"))
    text = text.replace('extern "C" {', " ")
    return text


def split_decls(text):
    """Top-level declarations (terminated by ';' outside braces), whitespace-normalised."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            if depth == 0:  # the closing brace of extern "C"
                continue
            depth -= 1
        if ch == ";" and depth == 0:
            decl = norm("".join(cur))
            if decl:
                out.append(decl)
            cur = []
        else:
            cur.append(ch)
    return out


def norm(s):
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"\s*([*(),{}=;])\s*", r"\1", s)
    return s


def drop_param_name(p):
    toks = re.findall(r"[A-Za-z_][A-Za-z0-9_]*|\*|\S", p)
    if len(toks) >= 2 and re.match(r"[A-Za-z_]", toks[-1]) and toks[-1] not in ("void", "char", "int"):
        toks = toks[:-1]
    return " ".join(toks).replace(" *", "*").replace("* ", "*")


FUNC = re.compile(r"^(.*?)\b(llmproxy_[a-z_]+)\((.*)\)$")


def classify(decls):
    """name -> normalised declaration, for typedefs and function prototypes."""
    funcs, types = {}, {}
    for d in decls:
        if d.startswith("typedef"):
            m = re.search(r"\(\*(\w+)\)", d)  # function pointer typedef
            key = m.group(1) if m else re.findall(r"(\w+)$", d)[0]
            types[key] = d
            continue
        m = FUNC.match(d)
        if not m:
            raise AssertionError("unrecognised declaration: %r" % d)
        ret, name, params = m.groups()
        params = ",".join(drop_param_name(p) for p in params.split(","))
        funcs[name] = norm(ret) + "|" + params
    return funcs, types


def header_decls(text):
    return classify(split_decls(strip_c(text)))


def cdef_text(lua_source):
    m = re.search(r"-- CDEF-BEGIN\s*ffi\.cdef\s*\[\[(.*?)\]\]\s*-- CDEF-END", lua_source, flags=re.S)
    assert m, "the ffi.cdef block (between -- CDEF-BEGIN and -- CDEF-END) was not found"
    return m.group(1)


def unbound(lua_source):
    return set(re.findall(r"^-- unbound: (\w+)", lua_source, flags=re.M))


def check(header_text, lua_source):
    """Returns the list of mismatches (empty when the cdef matches the header)."""
    problems = []
    h_funcs, h_types = header_decls(header_text)
    c_funcs, c_types = classify(split_decls(strip_c(cdef_text(lua_source))))
    skip = unbound(lua_source)
    for name, sig in c_funcs.items():
        if name not in h_funcs:
            problems.append("%s: declared in the cdef, not in the header" % name)
        elif h_funcs[name] != sig:
            problems.append("%s: cdef %s != header %s" % (name, sig, h_funcs[name]))
    for name, decl in c_types.items():
        if name not in h_types:
            problems.append("type %s: declared in the cdef, not in the header" % name)
        elif h_types[name] != decl:
            problems.append("type %s: cdef %s != header %s" % (name, decl, h_types[name]))
    for name in h_funcs:
        if name not in c_funcs and name not in skip:
            problems.append("%s: in the header, neither bound nor listed as unbound" % name)
    for name in h_types:
        if name not in c_types and name not in skip:
            problems.append("type %s: in the header, neither declared nor listed as unbound" % name)
    for name in skip:
        if name in c_funcs or name in c_types:
            problems.append("%s: listed as unbound but declared" % name)
        if name not in h_funcs and name not in h_types:
            problems.append("%s: listed as unbound but not in the header" % name)
    return problems


def compile_check(lua_source, tmp_path):
    """Compiles the cdef against the header; returns (ok, compiler output)."""
    cdef = strip_c(cdef_text(lua_source))
    decls = split_decls(cdef)
    protos = [d for d in decls if not d.startswith("typedef")]
    typedefs = [d for d in decls if d.startswith("typedef") and "{" in d]
    lines = ['#include "llmproxy.h"', "#include <stddef.h>"]
    lines += [p + ";" for p in protos]  # conflicting types with the header's are an error
    for t in typedefs:
        renamed = re.sub(r"\bllmproxy_", "cdef_llmproxy_", t)
        renamed = re.sub(r"\bLLMPROXY_", "CDEF_LLMPROXY_", renamed)
        lines.append(renamed + ";")
        name = re.findall(r"(\w+)$", t)[0]
        if t.startswith("typedef struct"):
            lines.append("_Static_assert(sizeof(cdef_%s) == sizeof(%s), \"size of %s\");" % (name, name, name))
            body = t[t.index("{") + 1:t.rindex("}")]
            for field in filter(None, body.split(";")):
                fname = re.findall(r"(\w+)$", field)[0]
                lines.append("_Static_assert(offsetof(cdef_%s, %s) == offsetof(%s, %s), \"%s.%s\");"
                             % (name, fname, name, fname, name, fname))
                lines.append("_Static_assert(sizeof(((cdef_%s*)0)->%s) == sizeof(((%s*)0)->%s), \"%s.%s size\");"
                             % (name, fname, name, fname, name, fname))
                lines.append("_Static_assert(_Generic(((cdef_%s*)0)->%s, __typeof__(((%s*)0)->%s): 1, default: 0), \"%s.%s type\");"
                             % (name, fname, name, fname, name, fname))
        elif t.startswith("typedef enum"):
            lines.append("_Static_assert(sizeof(cdef_%s) == sizeof(%s), \"size of %s\");" % (name, name, name))
            for const in re.findall(r"\b(LLMPROXY_\w+)", t):
                lines.append("_Static_assert((long)CDEF_%s == (long)%s, \"%s\");" % (const, const, const))
    src = tmp_path / "cdef_check.c"
    src.write_text("\n".join(lines) + "\n")
    r = subprocess.run([CC, "-std=gnu11", "-fsyntax-only", "-Werror", "-I", str(ROOT / "include"), str(src)],
                       capture_output=True, text=True)
    return r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------------

def test_cdef_matches_header():
    problems = check(HEADER.read_text(), LUA.read_text())
    assert problems == [], "\n".join(problems)


def test_every_bound_function_is_declared():
    h_funcs, _ = header_decls(HEADER.read_text())
    lua = LUA.read_text()
    c_funcs, _ = classify(split_decls(strip_c(cdef_text(lua))))
    assert set(c_funcs) | (unbound(lua) & set(h_funcs)) == set(h_funcs)
    # every function the Lua code calls through C. is declared in the cdef
    called = set(re.findall(r"\bC\.(llmproxy_\w+)|\blib_\.(llmproxy_\w+)", lua))
    called = {a or b for a, b in called}
    assert called and called <= set(c_funcs), called - set(c_funcs)


@pytest.mark.skipif(CC is None, reason="no C compiler")
def test_cdef_compiles_against_header(tmp_path):
    ok, out = compile_check(LUA.read_text(), tmp_path)
    assert ok, out


DRIFTS = [
    # (description, old, new)
    ("argument width", "void llmproxy_request_finish(struct llmproxy_request *req, uint32_t upstream_status);",
     "void llmproxy_request_finish(struct llmproxy_request *req, int upstream_status);"),
    ("return type", "uint64_t llmproxy_router_in_flight(", "uint32_t llmproxy_router_in_flight("),
    ("missing argument", "char *err, size_t err_cap);", "char *err);"),
    ("struct field", "  size_t name_len;", "  int name_len;"),
    ("enum value", "LLMPROXY_NO_ENDPOINT = 7,", "LLMPROXY_NO_ENDPOINT = 6,"),
    ("pointer level", "struct llmproxy_request **out);", "struct llmproxy_request *out);"),
]


@pytest.mark.parametrize("what,old,new", DRIFTS, ids=[d[0] for d in DRIFTS])
def test_drifted_cdef_is_caught(tmp_path, what, old, new):
    lua = LUA.read_text()
    assert old in cdef_text(lua), "drift fixture out of date: %r" % old
    drifted = lua.replace(old, new, 1)
    assert check(HEADER.read_text(), drifted), "normalised comparison missed a drifted %s" % what
    if CC:
        ok, _ = compile_check(drifted, tmp_path)
        assert not ok, "the compiler check missed a drifted %s" % what


def test_unbound_function_must_be_listed():
    lua = LUA.read_text()
    dropped = re.sub(r"void llmproxy_string_free\(char \*s\);\n", "", lua)
    assert dropped != lua
    assert any("llmproxy_string_free" in p for p in check(HEADER.read_text(), dropped))
