using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Checkpoints;

/// <summary>One tensor entry of a safetensors header.</summary>
public sealed record SafeTensorEntry(string Name, string DType, long[] Shape, long Begin, long End)
{
    public long NumElements => Shape.Aggregate(1L, (a, b) => a * b);
}

/// <summary>A safetensors header: entries in file order, the <c>__metadata__</c> strings, and where data starts.</summary>
public sealed record SafeTensorsHeader(List<SafeTensorEntry> Entries, Dictionary<string, string> Metadata, long DataStart);

/// <summary>The tensors and metadata of a safetensors file.</summary>
public sealed record SafeTensorsContent(Dictionary<string, Tensor> Tensors, Dictionary<string, string> Metadata);

/// <summary>
/// Reader and writer for the safetensors format (u64 little-endian header length, JSON header, raw little-endian
/// C-contiguous data). Reading never executes anything: the header is JSON and the payload raw numbers.
/// </summary>
public static class SafeTensors
{
    /// <summary>Header lengths above this are refused (the format's own reference limit is 100 MB).</summary>
    public const long MaxHeaderBytes = 100_000_000;

    static readonly Dictionary<string, (ScalarType Type, int Size)> DTypes = new()
    {
        ["F64"] = (ScalarType.Float64, 8), ["F32"] = (ScalarType.Float32, 4), ["F16"] = (ScalarType.Float16, 2),
        ["BF16"] = (ScalarType.BFloat16, 2), ["I64"] = (ScalarType.Int64, 8), ["I32"] = (ScalarType.Int32, 4),
        ["I16"] = (ScalarType.Int16, 2), ["I8"] = (ScalarType.Int8, 1), ["U8"] = (ScalarType.Byte, 1),
        ["BOOL"] = (ScalarType.Bool, 1),
    };

    /// <summary>True when the file starts like a safetensors file (a plausible header length followed by '{').</summary>
    public static bool LooksLikeSafeTensors(string path)
    {
        using var fs = File.OpenRead(path);
        if (fs.Length < 10) return false;
        Span<byte> head = stackalloc byte[9];
        fs.ReadExactly(head);
        var n = BinaryPrimitives.ReadUInt64LittleEndian(head);
        return n > 1 && (long)n <= Math.Min(MaxHeaderBytes, fs.Length - 8) && head[8] == (byte)'{';
    }

    /// <summary>Reads the header only: entries in file order and the <c>__metadata__</c> strings.</summary>
    public static SafeTensorsHeader ReadHeader(string path)
    {
        using var fs = OpenChecked(path);
        return ReadHeader(fs, path);
    }

    static FileStream OpenChecked(string path)
    {
        if (!File.Exists(path)) throw new CheckpointException(path, "file not found");
        return new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 20);
    }

    static SafeTensorsHeader ReadHeader(FileStream fs, string path)
    {
        if (fs.Length < 8) throw new CheckpointException(path, $"not a safetensors file: only {fs.Length} bytes");
        Span<byte> lenBytes = stackalloc byte[8];
        fs.ReadExactly(lenBytes);
        var n = BinaryPrimitives.ReadUInt64LittleEndian(lenBytes);
        if (n == 0 || n > MaxHeaderBytes || (long)n > fs.Length - 8)
            throw new CheckpointException(path, $"corrupt safetensors header: header length {n} does not fit a file of {fs.Length} bytes");
        var headerBytes = new byte[n];
        fs.ReadExactly(headerBytes);
        JsonObject header;
        try { header = JsonNode.Parse(headerBytes)!.AsObject(); }
        catch (Exception e) when (e is JsonException or InvalidOperationException)
        { throw new CheckpointException(path, $"corrupt safetensors header: {e.Message}"); }

        long dataStart = 8 + (long)n, dataLen = fs.Length - dataStart;
        var meta = new Dictionary<string, string>();
        var entries = new List<SafeTensorEntry>();
        foreach (var (name, node) in header)
        {
            if (name == "__metadata__")
            {
                if (node is JsonObject mo)
                    foreach (var (k, v) in mo) meta[k] = v is JsonValue jv && jv.TryGetValue<string>(out var s) ? s : v?.ToJsonString() ?? "";
                continue;
            }
            if (node is not JsonObject o) throw new CheckpointException(path, $"corrupt safetensors header: entry '{name}' is not an object");
            var dtype = (string?)o["dtype"] ?? throw new CheckpointException(path, $"tensor '{name}' has no dtype");
            if (!DTypes.TryGetValue(dtype, out var dt)) throw new CheckpointException(path, $"tensor '{name}' has unsupported dtype {dtype}");
            long[] shape, offs;
            try
            {
                shape = o["shape"]!.AsArray().Select(x => (long)x!).ToArray();
                offs = o["data_offsets"]!.AsArray().Select(x => (long)x!).ToArray();
            }
            catch (Exception ex) when (ex is InvalidOperationException or FormatException or NullReferenceException or OverflowException)
            { throw new CheckpointException(path, $"corrupt safetensors header: tensor '{name}' has no valid shape / data_offsets"); }
            if (offs.Length != 2 || shape.Length > 64 || shape.Any(d => d < 0) || shape.Aggregate(1.0, (a, b) => a * b) > 1e13)
                throw new CheckpointException(path, $"corrupt safetensors header: tensor '{name}' has shape [{string.Join(", ", shape)}] and data_offsets [{string.Join(", ", offs)}]");
            var e = new SafeTensorEntry(name, dtype, shape, offs[0], offs[1]);
            if (e.Begin < 0 || e.End < e.Begin || e.End > dataLen || (e.End - e.Begin) != e.NumElements * dt.Size)
                throw new CheckpointException(path,
                    $"tensor '{name}': data_offsets [{e.Begin}, {e.End}] do not match dtype {dtype} × shape [{string.Join(", ", shape)}] within {dataLen} data bytes (file truncated or corrupt)");
            entries.Add(e);
        }
        // As the reference reader: tensors may not share bytes (overlapping ranges would alias two tensors).
        SafeTensorEntry? prev = null;
        foreach (var e in entries.Where(x => x.End > x.Begin).OrderBy(x => x.Begin))
        {
            if (prev != null && e.Begin < prev.End)
                throw new CheckpointException(path, $"corrupt safetensors header: tensors '{prev.Name}' [{prev.Begin}, {prev.End}) and '{e.Name}' [{e.Begin}, {e.End}) overlap");
            prev = e;
        }
        return new SafeTensorsHeader(entries, meta, dataStart);
    }

    /// <summary>Reads every tensor (or those for which <paramref name="filter"/> is true) as CPU tensors.</summary>
    public static SafeTensorsContent Load(string path, Func<string, bool>? filter = null)
    {
        using var fs = OpenChecked(path);
        var (entries, meta, dataStart) = ReadHeader(fs, path);
        var result = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        foreach (var e in entries)
        {
            if (filter != null && !filter(e.Name)) continue;
            result[e.Name] = ReadTensor(fs, dataStart, e);
        }
        return new SafeTensorsContent(result, meta);
    }

    static Tensor ReadTensor(FileStream fs, long dataStart, SafeTensorEntry e)
    {
        var (type, _) = DTypes[e.DType];
        var t = torch.empty(e.Shape, type);
        long nbytes = e.End - e.Begin;
        if (nbytes == 0) return t;
        fs.Seek(dataStart + e.Begin, SeekOrigin.Begin);
        if (!BitConverter.IsLittleEndian) throw new PlatformNotSupportedException("big-endian hosts are not supported");
        ReadInto(fs, t, nbytes);
        return t;
    }

    internal static unsafe void ReadInto(Stream s, Tensor t, long nbytes)
    {
        // Read straight into the tensor's storage, in chunks (Span<byte> is limited to 2 GB).
        var basePtr = DataPointer(t);
        long done = 0;
        while (done < nbytes)
        {
            int chunk = (int)Math.Min(1 << 30, nbytes - done);
            var span = new Span<byte>(basePtr + done, chunk);
            s.ReadExactly(span);
            done += chunk;
        }
    }

    /// <summary>
    /// Address of a contiguous CPU tensor's data. libtorch memory is not moved by the GC, so the address stays valid
    /// while the tensor lives. (TorchSharp exposes it as a Span, which limits one tensor to 2 GB.)
    /// </summary>
    internal static unsafe byte* DataPointer(Tensor t)
    {
        if (!t.is_contiguous() || t.device_type != DeviceType.CPU) throw new ArgumentException("tensor must be contiguous and on the CPU");
        fixed (byte* p = t.bytes) return p;
    }

    static string DTypeName(ScalarType t) => DTypes.First(kv => kv.Value.Type == t).Key;

    /// <summary>
    /// Writes tensors (sorted by name, as the reference implementation does) and string metadata. The file is written
    /// to a temporary name beside the target and renamed at the end, so a crash never leaves a half-written file.
    /// </summary>
    public static void Save(string path, IReadOnlyDictionary<string, Tensor> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        var names = tensors.Keys.OrderBy(k => k, StringComparer.Ordinal).ToList();
        var header = new JsonObject();
        if (metadata is { Count: > 0 })
        {
            var m = new JsonObject();
            foreach (var (k, v) in metadata) m[k] = v;
            header["__metadata__"] = m;
        }
        long offset = 0;
        var cpu = new List<Tensor>();
        foreach (var name in names)
        {
            var t = tensors[name].detach().cpu().contiguous();
            cpu.Add(t);
            long nbytes = t.NumberOfElements * t.ElementSize;
            header[name] = new JsonObject
            {
                ["dtype"] = DTypeName(t.dtype),
                ["shape"] = new JsonArray(t.shape.Select(d => (JsonNode)d).ToArray()),
                ["data_offsets"] = new JsonArray(offset, offset + nbytes),
            };
            offset += nbytes;
        }
        var headerBytes = Encoding.UTF8.GetBytes(header.ToJsonString());
        int pad = (8 - headerBytes.Length % 8) % 8;
        AtomicFile.Write(path, fs =>
        {
            Span<byte> len = stackalloc byte[8];
            BinaryPrimitives.WriteUInt64LittleEndian(len, (ulong)(headerBytes.Length + pad));
            fs.Write(len);
            fs.Write(headerBytes);
            for (int i = 0; i < pad; i++) fs.WriteByte((byte)' ');
            foreach (var t in cpu) WriteTensorBytes(fs, t);
        });
        foreach (var t in cpu) t.Dispose();
    }

    static unsafe void WriteTensorBytes(Stream s, Tensor t)
    {
        long nbytes = t.NumberOfElements * t.ElementSize, done = 0;
        var basePtr = DataPointer(t);
        while (done < nbytes)
        {
            int chunk = (int)Math.Min(1 << 30, nbytes - done);
            s.Write(new ReadOnlySpan<byte>(basePtr + done, chunk));
            done += chunk;
        }
    }
}
