#!/usr/bin/env python3
"""Mark TorchSharp's need for GLIBCXX_3.4.32 as weak so Debian 12's libstdc++ (which stops at 3.4.30) can load it.

libLibTorchSharp.so 0.107.0 was linked with GCC 13 and records a version need for GLIBCXX_3.4.32, whose only symbol
(std::ios_base_library_init) no relocation uses. Setting VER_FLG_WEAK (2) in that vna_flags entry of .gnu.version_r
lets the dynamic loader accept the library. The edit is 2 bytes, idempotent, and only done when the system libstdc++
lacks the version. Usage: weak_glibcxx.py FILE... ; prints what it did.
"""
import struct, sys

SHT_GNU_VERNEED = 0x6ffffffe
VER_FLG_WEAK = 0x2
WANTED = b"GLIBCXX_3.4.32"

def patch(path):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return "not a 64-bit little-endian ELF file"
    e_shoff, = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = []
    for i in range(e_shnum):
        off = e_shoff + i * e_shentsize
        sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info = struct.unpack_from("<IIQQQQII", data, off)
        sections.append((sh_type, sh_offset, sh_size, sh_link, sh_info))
    for sh_type, sh_offset, sh_size, sh_link, sh_info in sections:
        if sh_type != SHT_GNU_VERNEED:
            continue
        strtab_off = sections[sh_link][1]
        vn = sh_offset
        for _ in range(sh_info):
            vn_version, vn_cnt, vn_file, vn_aux, vn_next = struct.unpack_from("<HHIII", data, vn)
            aux = vn + vn_aux
            for _ in range(vn_cnt):
                vna_hash, vna_flags, vna_other, vna_name, vna_next = struct.unpack_from("<IHHII", data, aux)
                name_off = strtab_off + vna_name
                name = bytes(data[name_off:data.index(0, name_off)])
                if name == WANTED:
                    if vna_flags & VER_FLG_WEAK:
                        return "already weak"
                    struct.pack_into("<H", data, aux + 4, vna_flags | VER_FLG_WEAK)
                    tmp = path + ".tmp-weak"
                    with open(tmp, "wb") as f:
                        f.write(data)
                    import os, shutil
                    shutil.copymode(path, tmp)
                    os.replace(tmp, path)
                    return "patched"
                if vna_next == 0:
                    break
                aux += vna_next
            if vn_next == 0:
                break
            vn += vn_next
    return "no GLIBCXX_3.4.32 need (nothing to do)"

if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(f"{p}: {patch(p)}")
