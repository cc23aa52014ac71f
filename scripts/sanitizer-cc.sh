#!/usr/bin/env bash
# Prints the compiler to build sanitizer (ASan + UBSan + LSan) test binaries with: Debian's clang
# when it can link such a program (its runtimes come in libclang-rt-14-dev), else gcc.
#
#   scripts/sanitizer-cc.sh c      clang or gcc
#   scripts/sanitizer-cc.sh c++    clang++ or g++
#   scripts/sanitizer-cc.sh clang  clang, or exit 1 when clang cannot build one
set -uo pipefail
probe() {
  printf 'int main(void) { return 0; }\n' |
    clang -fsanitize=address,undefined -x c - -o /dev/null >/dev/null 2>&1
}
case "${1:-c}" in
  c) probe && echo clang || echo gcc ;;
  c++) probe && echo clang++ || echo g++ ;;
  clang) probe && echo clang ;;
  *) echo "usage: $0 c|c++|clang" >&2; exit 2 ;;
esac
