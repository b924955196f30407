using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Parity;

/// <summary>
/// One golden fixture file made by running the official code (format: ../shared/fixtures/README.md). Tensor names
/// are prefixed <c>weights.</c> (official state_dict keys), <c>in.</c> (inputs), <c>out.</c> (outputs) and
/// <c>noise.</c> (recorded random draws); <c>__metadata__</c> names the case and holds the JSON config.
/// Non-safetensors fixtures (tokenizer.json, checkpoints/expected.json, schema/*.json) are represented with an
/// empty tensor map and their case inferred from the file name.
/// </summary>
public sealed class Fixture : IDisposable
{
    public string Path { get; }
    public string Case { get; }
    public IReadOnlyDictionary<string, string> Metadata { get; }
    public Dictionary<string, Tensor> Tensors { get; }
    Fixture? _weightsFrom;

    Fixture(string path, string @case, Dictionary<string, string> meta, Dictionary<string, Tensor> tensors)
    {
        Path = path; Case = @case; Metadata = meta; Tensors = tensors;
    }

    /// <summary>
    /// The case a file holds, read from its header only (cheap); <c>unknown:NAME</c> for a file that names none (every
    /// safetensors fixture names its case in <c>__metadata__["case"]</c>).
    /// </summary>
    public static string CaseOf(string path)
    {
        if (path.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase))
        {
            var (_, meta, _) = SafeTensors.ReadHeader(path);
            return meta.TryGetValue("case", out var c) ? c : "unknown:" + System.IO.Path.GetFileName(path);
        }
        var name = System.IO.Path.GetFileName(path);
        var dir = System.IO.Path.GetFileName(System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(path)) ?? "");
        if (name == "tokenizer.json") return "tokenizer";
        if (dir == "checkpoints" && name == "expected.json") return "checkpoint_formats";
        if (dir == "schema") return "schema_" + System.IO.Path.GetFileNameWithoutExtension(name);
        return "unknown:" + name;
    }

    /// <summary>
    /// True for files a runner treats as fixtures (not READMEs, vocabularies, checkpoint samples or safetensors files
    /// that name no case). A safetensors file whose header cannot be read counts, so that running it reports why.
    /// </summary>
    public static bool IsFixtureFile(string path)
    {
        var name = System.IO.Path.GetFileName(path);
        bool safetensors = name.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase);
        if (!safetensors && !name.EndsWith(".json", StringComparison.OrdinalIgnoreCase)) return false;
        try { return !CaseOf(path).StartsWith("unknown:", StringComparison.Ordinal); }
        catch (Exception) when (safetensors) { return true; }
    }

    public static Fixture Load(string path)
    {
        var @case = CaseOf(path);
        if (!path.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase))
            return new Fixture(path, @case, new Dictionary<string, string>(), new Dictionary<string, Tensor>());
        var (tensors, meta) = SafeTensors.Load(path);
        return new Fixture(path, @case, meta, tensors);
    }

    public JsonNode? Config => Metadata.TryGetValue("config", out var c) ? JsonNode.Parse(c) : null;
    public JsonNode? MetaJson(string key) => Metadata.TryGetValue(key, out var c) ? JsonNode.Parse(c) : null;

    public Tensor In(string name) => Get("in." + name);
    public Tensor Out(string name) => Get("out." + name);

    public Tensor Get(string name) => Tensors.TryGetValue(name, out var t) ? t
        : throw new KeyNotFoundException($"{Path}: fixture has no tensor '{name}'");

    /// <summary>Names of the expected outputs, without the <c>out.</c> prefix.</summary>
    public IEnumerable<string> OutputNames => Tensors.Keys.Where(k => k.StartsWith("out.", StringComparison.Ordinal)).Select(k => k[4..]);

    /// <summary>
    /// The state dict of one module (<c>weights.&lt;module&gt;.*</c> with the prefix removed). v2.0.0 files that share
    /// weights name the file holding them in <c>weights_from</c>; it is opened on demand.
    /// </summary>
    public Dictionary<string, Tensor> Weights(string? module = null)
    {
        var prefix = module == null ? "weights." : $"weights.{module}.";
        var own = Tensors.Where(kv => kv.Key.StartsWith(prefix, StringComparison.Ordinal))
            .ToDictionary(kv => kv.Key[prefix.Length..], kv => kv.Value, StringComparer.Ordinal);
        if (own.Count > 0 || !Metadata.TryGetValue("weights_from", out var from)) return own;
        // {"file": "sampler_guided.safetensors", "modules": [...]} (a bare file name is accepted too)
        var file = from.TrimStart().StartsWith('{') ? (string?)JsonNode.Parse(from)?["file"] ?? "" : from.Trim('"');
        var full = System.IO.Path.Combine(System.IO.Path.GetDirectoryName(Path)!, file);
        _weightsFrom ??= Load(full);
        return _weightsFrom.Weights(module);
    }

    public void Dispose()
    {
        foreach (var t in Tensors.Values) t.Dispose();
        Tensors.Clear();
        _weightsFrom?.Dispose();
    }
}
