using System.IO.Compression;
using System.Numerics;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Checkpoints;

/// <summary>
/// Reads files written by <c>torch.save</c>: the zip format (PyTorch ≥ 1.6) and the legacy format (a sequence of
/// pickles followed by raw storages). The object graph comes back as plain values (<see cref="PyDict"/>,
/// <see cref="PyTuple"/>, lists, numbers, strings) with CPU tensors in place of PyTorch tensors. Views are honoured:
/// size, stride and storage offset are applied as the file describes them (shared and expanded storages included).
/// </summary>
public static class TorchPickleFile
{
    static readonly BigInteger LegacyMagic = BigInteger.Parse("119547037146038801333356");
    const long LegacyProtocol = 1001;

    static readonly Dictionary<string, (ScalarType Type, int Size)> StorageDTypes = new()
    {
        ["FloatStorage"] = (ScalarType.Float32, 4), ["DoubleStorage"] = (ScalarType.Float64, 8),
        ["HalfStorage"] = (ScalarType.Float16, 2), ["BFloat16Storage"] = (ScalarType.BFloat16, 2),
        ["LongStorage"] = (ScalarType.Int64, 8), ["IntStorage"] = (ScalarType.Int32, 4),
        ["ShortStorage"] = (ScalarType.Int16, 2), ["CharStorage"] = (ScalarType.Int8, 1),
        ["ByteStorage"] = (ScalarType.Byte, 1), ["BoolStorage"] = (ScalarType.Bool, 1),
        ["UntypedStorage"] = (ScalarType.Byte, 1),
    };

    /// <summary>True for the zip flavour (starts with "PK\x03\x04").</summary>
    public static bool IsZip(string path)
    {
        using var fs = File.OpenRead(path);
        Span<byte> b = stackalloc byte[4];
        return fs.Read(b) == 4 && b[0] == 'P' && b[1] == 'K' && b[2] == 3 && b[3] == 4;
    }

    /// <summary>Loads the whole object graph of a torch.save file without executing anything from it.</summary>
    public static object? Load(string path)
    {
        if (!File.Exists(path)) throw new CheckpointException(path, "file not found");
        if (new FileInfo(path).Length == 0) throw new CheckpointException(path, "file is empty (0 bytes)");
        try
        {
            return IsZip(path) ? LoadZip(path) : LoadLegacy(path);
        }
        catch (CheckpointException) { throw; }
        catch (InvalidDataException e) { throw new CheckpointException(path, $"corrupt or truncated zip archive: {e.Message}", e); }
        catch (EndOfStreamException e) { throw new CheckpointException(path, "file is truncated", e); }
    }

    static object? LoadZip(string path)
    {
        using var zip = ZipFile.OpenRead(path);
        var pkl = zip.Entries.FirstOrDefault(e => e.FullName.EndsWith("/data.pkl", StringComparison.Ordinal) && e.FullName.Count(c => c == '/') == 1)
                  ?? zip.Entries.FirstOrDefault(e => e.FullName == "data.pkl");
        if (pkl == null)
        {
            if (zip.Entries.Any(e => e.FullName.Contains("/code/") || e.FullName.EndsWith("constants.pkl")))
                throw new CheckpointException(path, "this is a TorchScript archive (torch.jit.save), not a state dict; save model.state_dict() instead");
            throw new CheckpointException(path, "zip archive has no data.pkl: not a torch.save checkpoint");
        }
        var prefix = pkl.FullName[..^"data.pkl".Length];
        var byteorder = zip.GetEntry(prefix + "byteorder");
        if (byteorder != null)
        {
            using var r = new StreamReader(byteorder.Open());
            var order = r.ReadToEnd().Trim();
            if (order != "little") throw new CheckpointException(path, $"byte order '{order}' is not supported");
        }

        var storages = new Dictionary<string, Tensor>();
        object? Persistent(PyTuple pid)
        {
            // ('storage', storage_type, key, location, numel)
            if (pid.Count < 5 || pid[0] as string != "storage" || pid[1] is not PyGlobal st || pid[2] is not string key)
                throw new CheckpointException(path, $"unsupported persistent id {pid}");
            var numel = pid[4] is long n && n >= 0 && n < (1L << 40) ? n : throw new CheckpointException(path, $"storage size {pid[4]} is not a valid element count");
            return new StorageView(new StorageRef(st.Name, key, pid[3] as string ?? "cpu", numel), 0);
        }

        object? graph;
        using (var ps = pkl.Open())
        using (var buffered = new BufferedStream(ps, 1 << 16))
            graph = new SafeUnpickler(buffered, path, Persistent).Load();

        Tensor LoadStorage(StorageRef r)
        {
            if (storages.TryGetValue(r.Key, out var t)) return t;
            var entry = zip.GetEntry(prefix + "data/" + r.Key) ?? throw new CheckpointException(path, $"storage '{r.Key}' is missing from the archive");
            var (type, size) = DType(path, r.StorageType);
            long nbytes = r.NumElements * size;
            if (entry.Length < nbytes) throw new CheckpointException(path, $"storage '{r.Key}' has {entry.Length} bytes, expected {nbytes} (file truncated?)");
            t = torch.empty(new[] { r.NumElements }, type);
            using (var es = entry.Open()) SafeTensors.ReadInto(es, t, nbytes);
            storages[r.Key] = t;
            return t;
        }
        try { return Materialise(path, graph, LoadStorage); }
        finally { foreach (var s in storages.Values) s.Dispose(); }
    }

    static object? LoadLegacy(string path)
    {
        using var fs = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 16);
        var magic = new SafeUnpickler(fs, path, null).Load();
        bool isMagic = magic is BigInteger bi && bi == LegacyMagic;
        if (!isMagic)
            throw new CheckpointException(path, "not a PyTorch checkpoint: neither a zip archive nor the legacy torch.save format (a plain pickle or another file type)");
        var protocol = new SafeUnpickler(fs, path, null).Load();
        if (protocol is not long p || p != LegacyProtocol) throw new CheckpointException(path, $"unsupported legacy protocol version {protocol}");
        _ = new SafeUnpickler(fs, path, null).Load(); // sys_info: endianness and type sizes
        var roots = new Dictionary<string, StorageRef>();
        object? Persistent(PyTuple pid)
        {
            // ('storage', storage_type, root_key, location, numel, view_metadata)
            if (pid.Count < 6 || pid[0] as string != "storage" || pid[1] is not PyGlobal st || pid[2] is not string key)
                throw new CheckpointException(path, $"unsupported persistent id {pid} in legacy file");
            var numel = pid[4] is long n && n >= 0 && n < (1L << 40) ? n : throw new CheckpointException(path, $"storage size {pid[4]} is not a valid element count");
            if (!roots.TryGetValue(key, out var root)) roots[key] = root = new StorageRef(st.Name, key, pid[3] as string ?? "cpu", numel);
            long offset = 0;
            if (pid[5] is PyTuple view && view.Count >= 2 && view[1] is long vo) offset = vo;
            return new StorageView(root, offset);
        }
        var graph = new SafeUnpickler(fs, path, Persistent).Load();
        var keys = new SafeUnpickler(fs, path, null).Load() as List<object?>
                   ?? throw new CheckpointException(path, "legacy file has no storage key list");
        var storages = new Dictionary<string, Tensor>();
        Span<byte> nb = stackalloc byte[8];
        try
        {
            foreach (var k in keys)
            {
                var key = k as string ?? throw new CheckpointException(path, "storage key is not a string");
                if (!roots.TryGetValue(key, out var r)) throw new CheckpointException(path, $"storage '{key}' is listed but never referenced");
                var (type, size) = DType(path, r.StorageType);
                fs.ReadExactly(nb);
                long numel = BitConverter.ToInt64(nb);
                if (numel < 0 || numel * size > fs.Length - fs.Position)
                    throw new CheckpointException(path, $"storage '{key}' claims {numel} elements but the file is truncated");
                var t = torch.empty(new[] { numel }, type);
                SafeTensors.ReadInto(fs, t, numel * size);
                storages[key] = t;
            }
            return Materialise(path, graph, r => storages.TryGetValue(r.Key, out var t) ? t
                : throw new CheckpointException(path, $"storage '{r.Key}' has no data in the file"));
        }
        finally { foreach (var s in storages.Values) s.Dispose(); }
    }

    static (ScalarType, int) DType(string path, string storageType) =>
        StorageDTypes.TryGetValue(storageType, out var d) ? d : throw new CheckpointException(path, $"unsupported storage type {storageType}");

    /// <summary>Replaces every pending tensor in the graph by a real tensor that owns its memory.</summary>
    /// <summary>State dicts nest a few levels (Lightning: checkpoint → state_dict → tensors); a file nesting deeper
    /// than this is refused instead of exhausting the stack (which no handler can catch).</summary>
    public const int MaxNesting = 1000;

    static object? Materialise(string path, object? o, Func<StorageRef, Tensor> storage, int depth = 0)
    {
        if (depth > MaxNesting)
            throw new CheckpointException(path, $"the pickle nests containers more than {MaxNesting} levels deep; not a state dict (refused, nothing was executed)");
        switch (o)
        {
            case PendingTensor p:
            {
                var baseT = storage(p.Storage.Storage);
                long offset = p.Storage.Offset + p.StorageOffset;
                long numel = p.Size.Aggregate(1L, (a, b) => a * b);
                if (numel == 0) return torch.empty(p.Size, baseT.dtype);
                long maxIndex = offset + p.Size.Zip(p.Stride).Sum(z => (z.First - 1) * z.Second);
                if (offset < 0 || maxIndex >= baseT.shape[0])
                    throw new CheckpointException(path, $"tensor view (offset {offset}, size [{string.Join(",", p.Size)}], stride [{string.Join(",", p.Stride)}]) runs past its storage of {baseT.shape[0]} elements");
                using var view = baseT.as_strided(p.Size, p.Stride, offset);
                var t = torch.empty(p.Size, baseT.dtype);
                t.copy_(view);
                return t;
            }
            case PyDict d:
            {
                var r = new PyDict();
                foreach (var (k, v) in d) r[k] = Materialise(path, v, storage, depth + 1);
                return r;
            }
            case List<object?> l:
                return l.Select(x => Materialise(path, x, storage, depth + 1)).ToList();
            case PyTuple t:
                return new PyTuple(t.Items.Select(x => Materialise(path, x, storage, depth + 1)).ToArray());
            case StorageView:
                throw new CheckpointException(path, "a bare storage (not a tensor) is not supported in a state dict");
            default:
                return o;
        }
    }
}
