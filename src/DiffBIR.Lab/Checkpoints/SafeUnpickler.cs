using System.Numerics;
using System.Text;

namespace DiffBIR.Lab.Checkpoints;

/// <summary>A Python tuple (immutable, compared by value so that it can be a dictionary key).</summary>
public sealed class PyTuple : IEquatable<PyTuple>
{
    public object?[] Items { get; }
    public PyTuple(params object?[] items) => Items = items;
    public int Count => Items.Length;
    public object? this[int i] => Items[i];
    public bool Equals(PyTuple? o) => o != null && Items.Length == o.Items.Length && Items.Zip(o.Items).All(p => Equals(p.First, p.Second));
    public override bool Equals(object? obj) => Equals(obj as PyTuple);
    public override int GetHashCode() => Items.Aggregate(17, (h, x) => h * 31 + (x?.GetHashCode() ?? 0));
    public override string ToString() => "(" + string.Join(", ", Items.Select(x => x?.ToString() ?? "None")) + ")";
}

/// <summary>A Python dict or OrderedDict; keys keep insertion order.</summary>
public sealed class PyDict : OrderedDictionary<object, object?>
{
    public PyDict() : base() { }
}

/// <summary>A reference to a Python global that passed the allow-list (never a callable of the file's choosing).</summary>
public sealed record PyGlobal(string Module, string Name)
{
    public string FullName => $"{Module}.{Name}";
}

/// <summary>The reference a torch pickle makes to one storage: its element type, key, and element count.</summary>
public sealed record StorageRef(string StorageType, string Key, string Location, long NumElements);

/// <summary>A storage seen from an element offset (legacy files can refer to views of a root storage).</summary>
public sealed record StorageView(StorageRef Storage, long Offset);

/// <summary>A tensor described by the pickle; its bytes are attached after unpickling (legacy files store them last).</summary>
public sealed record PendingTensor(StorageView Storage, long StorageOffset, long[] Size, long[] Stride);

/// <summary>
/// A pickle reader that builds plain data and never executes anything from the file. Every GLOBAL (and every
/// STACK_GLOBAL, INST, OBJ or extension code) is checked against a short allow-list of what a PyTorch state dict
/// needs; any other name stops the load at once with <see cref="PickleSecurityException"/> naming it, before any
/// call is made. The allowed callables are re-implemented here as data constructors.
/// </summary>
public sealed class SafeUnpickler
{
    static readonly HashSet<string> StorageTypes = new()
    {
        "FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage", "LongStorage", "IntStorage",
        "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage", "UntypedStorage",
    };

    static readonly HashSet<string> AllowedGlobals = new()
    {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
        "torch._tensor._rebuild_from_type_v2", "torch.Tensor", "torch.nn.parameter.Parameter",
        "torch.Size", "_codecs.encode", "builtins.set", "builtins.frozenset",
    };

    /// <summary>Whether a global name is on the allow-list (exposed for documentation and tests).</summary>
    public static bool IsAllowed(string module, string name) =>
        AllowedGlobals.Contains($"{module}.{name}") || (module is "torch" or "torch.storage" && StorageTypes.Contains(name));

    static readonly object Mark = new();

    readonly Stream _s;
    readonly string _path;
    readonly Func<PyTuple, object?>? _persistentLoad;
    readonly List<object?> _stack = new();
    readonly Dictionary<long, object?> _memo = new();

    public SafeUnpickler(Stream s, string path, Func<PyTuple, object?>? persistentLoad)
    {
        _s = s; _path = path; _persistentLoad = persistentLoad;
    }

    CheckpointException Corrupt(string why) => new(_path, $"corrupt or truncated pickle: {why}");

    byte ReadByte()
    {
        int b = _s.ReadByte();
        if (b < 0) throw Corrupt("unexpected end of file");
        return (byte)b;
    }

    byte[] ReadBytes(long n)
    {
        if (n < 0 || n > int.MaxValue) throw Corrupt($"implausible length {n}");
        if (_s.CanSeek && n > _s.Length - _s.Position) throw Corrupt($"a value of {n} bytes runs past the end of the file");
        var b = new byte[n];
        try { _s.ReadExactly(b); } catch (EndOfStreamException) { throw Corrupt("unexpected end of file"); }
        return b;
    }

    string ReadLine()
    {
        var sb = new StringBuilder();
        while (true)
        {
            var b = ReadByte();
            if (b == '\n') return sb.ToString();
            sb.Append((char)b);
            if (sb.Length > 1 << 16) throw Corrupt("line too long");
        }
    }

    uint U32() => BitConverter.ToUInt32(ReadBytes(4));
    object? Pop() { if (_stack.Count == 0) throw Corrupt("stack underflow"); var x = _stack[^1]; _stack.RemoveAt(_stack.Count - 1); return x; }
    object? Top() => _stack.Count == 0 ? throw Corrupt("stack underflow") : _stack[^1];

    List<object?> PopMark()
    {
        int i = _stack.LastIndexOf(Mark);
        if (i < 0) throw Corrupt("mark not found");
        var items = _stack.GetRange(i + 1, _stack.Count - i - 1);
        _stack.RemoveRange(i, _stack.Count - i);
        return items;
    }

    PyGlobal Global(string module, string name)
    {
        if (!IsAllowed(module, name)) throw new PickleSecurityException(_path, $"{module}.{name}");
        return new PyGlobal(module, name);
    }

    static object FromLong(byte[] bytes)
    {
        if (bytes.Length == 0) return 0L;
        var v = new BigInteger(bytes, isUnsigned: false, isBigEndian: false);
        return v >= long.MinValue && v <= long.MaxValue ? (object)(long)v : v;
    }

    /// <summary>Reads one pickle (up to and including STOP) and returns its value.</summary>
    public object? Load()
    {
        _stack.Clear(); _memo.Clear();
        while (true)
        {
            byte op = ReadByte();
            switch (op)
            {
                case 0x80: ReadByte(); break;                                   // PROTO
                case 0x95: ReadBytes(8); break;                                 // FRAME (framing is only a hint)
                case 0x2e: return Pop();                                        // STOP
                case 0x28: _stack.Add(Mark); break;                             // MARK
                case 0x30: Pop(); break;                                        // POP
                case 0x31: PopMark(); break;                                    // POP_MARK
                case 0x32: _stack.Add(Top()); break;                            // DUP
                case 0x4e: _stack.Add(null); break;                             // NONE
                case 0x88: _stack.Add(true); break;                             // NEWTRUE
                case 0x89: _stack.Add(false); break;                            // NEWFALSE
                case 0x4a: _stack.Add((long)BitConverter.ToInt32(ReadBytes(4))); break;   // BININT
                case 0x4b: _stack.Add((long)ReadByte()); break;                 // BININT1
                case 0x4d: _stack.Add((long)BitConverter.ToUInt16(ReadBytes(2))); break; // BININT2
                case 0x8a: _stack.Add(FromLong(ReadBytes(ReadByte()))); break;  // LONG1
                case 0x8b: _stack.Add(FromLong(ReadBytes(BitConverter.ToInt32(ReadBytes(4))))); break; // LONG4
                case 0x49:                                                       // INT (text)
                {
                    var l = ReadLine();
                    _stack.Add(l == "01" ? true : l == "00" ? false : long.Parse(l, System.Globalization.CultureInfo.InvariantCulture));
                    break;
                }
                case 0x4c: _stack.Add((object)BigInteger.Parse(ReadLine().TrimEnd('L'), System.Globalization.CultureInfo.InvariantCulture)); break; // LONG (text)
                case 0x47:                                                       // BINFLOAT (big-endian double)
                {
                    var b = ReadBytes(8); Array.Reverse(b); _stack.Add(BitConverter.ToDouble(b)); break;
                }
                case 0x46: _stack.Add(double.Parse(ReadLine(), System.Globalization.CultureInfo.InvariantCulture)); break; // FLOAT
                case 0x58: _stack.Add(Encoding.UTF8.GetString(ReadBytes(U32()))); break;          // BINUNICODE
                case 0x8c: _stack.Add(Encoding.UTF8.GetString(ReadBytes(ReadByte()))); break;      // SHORT_BINUNICODE
                case 0x8d: _stack.Add(Encoding.UTF8.GetString(ReadBytes((long)BitConverter.ToUInt64(ReadBytes(8))))); break; // BINUNICODE8
                case 0x56: _stack.Add(ReadLine()); break;                                          // UNICODE (raw-unicode-escape; ASCII here)
                case 0x54: _stack.Add(Encoding.Latin1.GetString(ReadBytes(BitConverter.ToInt32(ReadBytes(4))))); break; // BINSTRING
                case 0x55: _stack.Add(Encoding.Latin1.GetString(ReadBytes(ReadByte()))); break;    // SHORT_BINSTRING
                case 0x53:                                                                         // STRING (quoted)
                {
                    var l = ReadLine();
                    _stack.Add(l.Length >= 2 ? l[1..^1] : l);
                    break;
                }
                case 0x42: _stack.Add(ReadBytes(U32())); break;                                    // BINBYTES
                case 0x43: _stack.Add(ReadBytes(ReadByte())); break;                               // SHORT_BINBYTES
                case 0x8e: _stack.Add(ReadBytes((long)BitConverter.ToUInt64(ReadBytes(8)))); break; // BINBYTES8
                case 0x96: _stack.Add(ReadBytes((long)BitConverter.ToUInt64(ReadBytes(8)))); break; // BYTEARRAY8
                case 0x29: _stack.Add(new PyTuple()); break;                                       // EMPTY_TUPLE
                case 0x74: _stack.Add(new PyTuple(PopMark().ToArray())); break;                    // TUPLE
                case 0x85: _stack.Add(new PyTuple(Pop())); break;                                  // TUPLE1
                case 0x86: { var b = Pop(); var a = Pop(); _stack.Add(new PyTuple(a, b)); break; } // TUPLE2
                case 0x87: { var c = Pop(); var b = Pop(); var a = Pop(); _stack.Add(new PyTuple(a, b, c)); break; } // TUPLE3
                case 0x5d: _stack.Add(new List<object?>()); break;                                 // EMPTY_LIST
                case 0x6c: _stack.Add(PopMark()); break;                                           // LIST
                case 0x61: { var v = Pop(); AsList(Top()).Add(v); break; }                         // APPEND
                case 0x65: { var items = PopMark(); AsList(Top()).AddRange(items); break; }        // APPENDS
                case 0x7d: _stack.Add(new PyDict()); break;                                        // EMPTY_DICT
                case 0x64:                                                                         // DICT
                {
                    var items = PopMark(); var d = new PyDict();
                    for (int i = 0; i + 1 < items.Count; i += 2) d[Key(items[i])] = items[i + 1];
                    _stack.Add(d); break;
                }
                case 0x73: { var v = Pop(); var k = Pop(); AsDict(Top())[Key(k)] = v; break; }     // SETITEM
                case 0x75:                                                                         // SETITEMS
                {
                    var items = PopMark(); var d = AsDict(Top());
                    for (int i = 0; i + 1 < items.Count; i += 2) d[Key(items[i])] = items[i + 1];
                    break;
                }
                case 0x8f: _stack.Add(new List<object?>()); break;                                 // EMPTY_SET (as a list)
                case 0x90: { var items = PopMark(); AsList(Top()).AddRange(items); break; }        // ADDITEMS
                case 0x91: _stack.Add(PopMark()); break;                                           // FROZENSET
                case 0x70: _memo[long.Parse(ReadLine(), System.Globalization.CultureInfo.InvariantCulture)] = Top(); break; // PUT
                case 0x71: _memo[ReadByte()] = Top(); break;                                       // BINPUT
                case 0x72: _memo[U32()] = Top(); break;                                            // LONG_BINPUT
                case 0x94: _memo[_memo.Count] = Top(); break;                                      // MEMOIZE
                case 0x67: _stack.Add(Memo(long.Parse(ReadLine(), System.Globalization.CultureInfo.InvariantCulture))); break; // GET
                case 0x68: _stack.Add(Memo(ReadByte())); break;                                    // BINGET
                case 0x6a: _stack.Add(Memo(U32())); break;                                         // LONG_BINGET
                case 0x63: { var m = ReadLine(); var n = ReadLine(); _stack.Add(Global(m, n)); break; } // GLOBAL
                case 0x93:                                                                         // STACK_GLOBAL
                {
                    var n = Pop() as string; var m = Pop() as string;
                    if (m == null || n == null) throw Corrupt("STACK_GLOBAL needs two strings");
                    _stack.Add(Global(m, n)); break;
                }
                case 0x82: case 0x83: case 0x84:                                                   // EXT1/2/4: the copyreg registry
                    throw new PickleSecurityException(_path, "copyreg extension code");
                case 0x69:                                                                         // INST
                {
                    var g = Global(ReadLine(), ReadLine());
                    _stack.Add(Call(g, new PyTuple(PopMark().ToArray()))); break;
                }
                case 0x6f:                                                                         // OBJ
                {
                    var items = PopMark();
                    if (items.Count == 0 || items[0] is not PyGlobal g) throw Corrupt("OBJ without a class");
                    _stack.Add(Call(g, new PyTuple(items.Skip(1).ToArray()))); break;
                }
                case 0x81:                                                                         // NEWOBJ
                {
                    var args = Pop() as PyTuple ?? throw Corrupt("NEWOBJ without argument tuple");
                    if (Pop() is not PyGlobal g) throw Corrupt("NEWOBJ without a class");
                    _stack.Add(Call(g, args)); break;
                }
                case 0x92:                                                                         // NEWOBJ_EX
                {
                    Pop(); var args = Pop() as PyTuple ?? throw Corrupt("NEWOBJ_EX without argument tuple");
                    if (Pop() is not PyGlobal g) throw Corrupt("NEWOBJ_EX without a class");
                    _stack.Add(Call(g, args)); break;
                }
                case 0x52:                                                                         // REDUCE
                {
                    var args = Pop() as PyTuple ?? throw Corrupt("REDUCE without argument tuple");
                    var f = Pop();
                    if (f is not PyGlobal g) throw Corrupt($"REDUCE on a non-callable value ({f?.GetType().Name ?? "None"})");
                    _stack.Add(Call(g, args)); break;
                }
                case 0x62:                                                                         // BUILD
                {
                    var state = Pop();
                    var obj = Top();
                    // OrderedDict state (e.g. the `_metadata` attribute of a state dict) and tensor state carry
                    // nothing we need; anything else would mean setting attributes of an object we do not model.
                    if (obj is PyDict or PendingTensor) break;
                    throw Corrupt($"BUILD on an unsupported object ({obj?.GetType().Name ?? "None"})");
                }
                case 0x51:                                                                         // BINPERSID
                {
                    var pid = Pop();
                    _stack.Add(Persistent(pid)); break;
                }
                case 0x50: _stack.Add(Persistent(ReadLine())); break;                              // PERSID
                case 0x97: case 0x98:
                    throw Corrupt("out-of-band buffers are not supported");
                default:
                    throw Corrupt($"unknown opcode 0x{op:x2} at byte {_s.Position - 1}");
            }
        }
    }

    object? Persistent(object? pid)
    {
        if (_persistentLoad == null) throw Corrupt("persistent reference in a pickle that should have none");
        if (pid is not PyTuple t) throw Corrupt("persistent id is not a tuple");
        return _persistentLoad(t);
    }

    object? Memo(long k) => _memo.TryGetValue(k, out var v) ? v : throw Corrupt($"memo key {k} missing");
    List<object?> AsList(object? o) => o as List<object?> ?? throw Corrupt($"append to a non-list ({o?.GetType().Name})");
    PyDict AsDict(object? o) => o as PyDict ?? throw Corrupt($"setitem on a non-dict ({o?.GetType().Name})");
    object Key(object? k) => k ?? "None";

    static long[] Longs(object? o, string what, SafeUnpickler u) => o switch
    {
        PyTuple t => t.Items.Select(x => x is long l ? l : throw u.Corrupt($"{what} holds a non-integer")).ToArray(),
        List<object?> l => l.Select(x => x is long v ? v : throw u.Corrupt($"{what} holds a non-integer")).ToArray(),
        _ => throw u.Corrupt($"{what} is not a tuple"),
    };

    /// <summary>The allowed callables, re-implemented as data constructors.</summary>
    object? Call(PyGlobal g, PyTuple a)
    {
        switch (g.FullName)
        {
            case "collections.OrderedDict":
                return new PyDict();
            case "builtins.set":
            case "builtins.frozenset":
                return a.Count == 0 ? new List<object?>() : a[0] as List<object?> ?? new List<object?>();
            case "torch.Size":
                return a.Count == 0 ? new PyTuple() : a[0];
            case "_codecs.encode":
                return a[0] is string s ? Encoding.Latin1.GetBytes(s) : throw Corrupt("_codecs.encode of a non-string");
            case "torch._utils._rebuild_tensor":
            case "torch._utils._rebuild_tensor_v2":
            {
                if (a.Count < 4) throw Corrupt("_rebuild_tensor needs 4 arguments");
                var storage = a[0] as StorageView ?? throw Corrupt("_rebuild_tensor without a storage");
                if (a[1] is not long off) throw Corrupt("storage offset is not an integer");
                var size = Longs(a[2], "size", this);
                var stride = Longs(a[3], "stride", this);
                // Checked here, before anything is allocated: libtorch aborts the process on a negative size.
                if (off < 0 || size.Any(x => x < 0) || stride.Any(x => x < 0) || size.Length != stride.Length || size.Length > 64)
                    throw Corrupt($"invalid tensor geometry (offset {off}, size [{string.Join(",", size)}], stride [{string.Join(",", stride)}])");
                long numel = 1;
                foreach (var x in size) { numel *= x; if (numel > (1L << 40)) throw Corrupt($"tensor of size [{string.Join(",", size)}] is impossibly large"); if (numel == 0) break; }
                return new PendingTensor(storage, off, size, stride);
            }
            case "torch._utils._rebuild_parameter":
            case "torch._utils._rebuild_parameter_with_state":
                return a.Count > 0 && a[0] is PendingTensor p ? p : throw Corrupt("_rebuild_parameter without a tensor");
            case "torch._tensor._rebuild_from_type_v2":
            {
                // (func, new_type, args, state): only plain tensors and parameters are accepted.
                if (a.Count < 3 || a[0] is not PyGlobal f || a[1] is not PyGlobal type || a[2] is not PyTuple args)
                    throw Corrupt("malformed _rebuild_from_type_v2");
                if (type.FullName is not ("torch.Tensor" or "torch.nn.parameter.Parameter"))
                    throw new PickleSecurityException(_path, type.FullName);
                return Call(f, args);
            }
            default:
                // A storage class or torch.Tensor used as a value is fine; calling one is not something a state dict does.
                throw new PickleSecurityException(_path, g.FullName + " (called)");
        }
    }
}
