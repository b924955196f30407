using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Checkpoints;

/// <summary>A name → tensor map read from a checkpoint, with where it came from and what was done to it.</summary>
public sealed class StateDict : IDisposable
{
    public string SourcePath { get; }
    /// <summary>"safetensors", "torch-zip" or "torch-legacy".</summary>
    public string Format { get; }
    public Dictionary<string, Tensor> Tensors { get; }
    /// <summary>safetensors <c>__metadata__</c>, or the plain top-level values of a pickle (epoch, global_step, …).</summary>
    public Dictionary<string, string> Metadata { get; }
    /// <summary>What the loader did (unwrapped 'state_dict', stripped 'module.', skipped a non-tensor entry, …).</summary>
    public List<string> Notes { get; }

    public StateDict(string sourcePath, string format, Dictionary<string, Tensor> tensors, Dictionary<string, string> metadata, List<string> notes)
    {
        SourcePath = sourcePath; Format = format; Tensors = tensors; Metadata = metadata; Notes = notes;
    }

    public Tensor this[string key] => Tensors[key];
    public int Count => Tensors.Count;

    public void Dispose()
    {
        foreach (var t in Tensors.Values) t.Dispose();
        Tensors.Clear();
    }
}

/// <summary>
/// Opens any checkpoint the official DiffBIR weights come in — safetensors, PyTorch zip (.pth/.pt/.ckpt) and legacy
/// pickles — as a <see cref="StateDict"/>, with the official unwrapping rules. Never executes code from the file.
/// </summary>
public static class Checkpoint
{
    /// <summary>Containers that hold the state dict, in the order the official loaders look for them.</summary>
    static readonly string[] Wrappers = { "state_dict", "params_ema", "params" };

    public static StateDict Load(string path, bool unwrap = true, bool stripModulePrefix = true)
    {
        if (!File.Exists(path)) throw new CheckpointException(path, "file not found");
        if (new FileInfo(path).Length == 0) throw new CheckpointException(path, "file is empty (0 bytes)");
        // The parser is chosen by content; a .safetensors name with other content is reported as a bad safetensors file.
        if (SafeTensors.LooksLikeSafeTensors(path) || path.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase))
        {
            var (tensors, meta) = SafeTensors.Load(path);
            var notes = new List<string>();
            var result = new StateDict(path, "safetensors", tensors, meta, notes);
            if (stripModulePrefix) StripModule(result);
            return result;
        }
        var format = TorchPickleFile.IsZip(path) ? "torch-zip" : "torch-legacy";
        if (format == "torch-legacy")
        {
            var head = new byte[2];
            using (var fs = File.OpenRead(path)) fs.ReadAtLeast(head, 2, throwOnEndOfStream: false);
            if (head[0] != 0x80) // every torch.save pickle starts with the PROTO opcode
                throw new CheckpointException(path, $"not a checkpoint: neither safetensors, a PyTorch zip archive nor a legacy torch.save file (starts with bytes {head[0]:x2} {head[1]:x2})");
        }
        var graph = TorchPickleFile.Load(path);
        return FromGraph(path, format, graph, unwrap, stripModulePrefix);
    }

    static StateDict FromGraph(string path, string format, object? graph, bool unwrap, bool strip)
    {
        var notes = new List<string>();
        var meta = new Dictionary<string, string>();
        if (graph is not PyDict top)
        {
            DisposeGraph(graph);
            throw new CheckpointException(path, $"the checkpoint holds a {Describe(graph)}, not a dictionary of tensors");
        }
        var sd = top;
        if (unwrap)
        {
            foreach (var w in Wrappers)
            {
                if (top.TryGetValue(w, out var inner) && inner is PyDict d)
                {
                    notes.Add($"unwrapped '{w}'");
                    sd = d;
                    foreach (var (k, v) in top)
                        if (!ReferenceEquals(v, d))
                        {
                            if (IsPlain(v)) meta[k.ToString()!] = FormatPlain(v);
                            else { notes.Add($"ignored top-level entry '{k}' ({Describe(v)})"); DisposeGraph(v); }
                        }
                    break;
                }
            }
        }
        var tensors = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        foreach (var (k, v) in sd)
        {
            var key = k as string ?? k.ToString()!;
            if (v is Tensor t) tensors[key] = t;
            else
            {
                notes.Add($"skipped non-tensor entry '{key}' ({Describe(v)})");
                DisposeGraph(v);
            }
        }
        var result = new StateDict(path, format, tensors, meta, notes);
        if (strip) StripModule(result);
        return result;
    }

    /// <summary>DataParallel / DistributedDataParallel checkpoints prefix every key with 'module.'.</summary>
    static void StripModule(StateDict sd)
    {
        var keys = sd.Tensors.Keys.Where(k => k.StartsWith("module.", StringComparison.Ordinal)).ToList();
        if (keys.Count == 0) return;
        foreach (var k in keys)
        {
            var t = sd.Tensors[k];
            sd.Tensors.Remove(k);
            sd.Tensors[k["module.".Length..]] = t;
        }
        sd.Notes.Add($"stripped 'module.' from {keys.Count} keys");
    }

    static bool IsPlain(object? v) => v is null or string or long or double or bool or System.Numerics.BigInteger;
    static string FormatPlain(object? v) => v switch
    {
        null => "None", bool b => b ? "True" : "False",
        double d => d.ToString("R", System.Globalization.CultureInfo.InvariantCulture),
        _ => Convert.ToString(v, System.Globalization.CultureInfo.InvariantCulture) ?? "",
    };

    static string Describe(object? v) => v switch
    {
        null => "None", PyDict d => $"dict of {d.Count}", List<object?> l => $"list of {l.Count}", PyTuple t => $"tuple of {t.Count}",
        Tensor t => $"tensor {t.dtype} [{string.Join(", ", t.shape)}]", _ => v.GetType().Name,
    };

    static void DisposeGraph(object? o)
    {
        switch (o)
        {
            case Tensor t: t.Dispose(); break;
            case PyDict d: foreach (var v in d.Values) DisposeGraph(v); break;
            case List<object?> l: foreach (var v in l) DisposeGraph(v); break;
            case PyTuple tp: foreach (var v in tp.Items) DisposeGraph(v); break;
        }
    }
}
