using System.Text.Json;
using System.Text.Json.Serialization;

namespace DiffBIR.Lab.Weights;

/// <summary>One official checkpoint file: where it comes from and what it loads into.</summary>
public sealed record WeightFile(
    string Id, string File, string Url,
    [property: JsonPropertyName("size_bytes")] long? SizeBytes,
    string? Sha256, string Format,
    [property: JsonPropertyName("loads_into")] string LoadsInto,
    string Loading);

/// <summary>Which files a version (v1, v2, v2.1) uses for each task (sr, face, denoise).</summary>
public sealed record WeightPreset(
    string Schedule, string Sd,
    Dictionary<string, string> Controlnet,
    Dictionary<string, string> Cleaner);

/// <summary>
/// weights/manifest.json: every official checkpoint the presets use (file name, URL, expected size and SHA-256
/// where known, how it is loaded) and which preset/task uses which. Machine-readable for the weights tools.
/// </summary>
public sealed record WeightsManifest(
    [property: JsonPropertyName("schema_version")] int SchemaVersion,
    List<WeightFile> Files,
    Dictionary<string, WeightPreset> Presets,
    List<string> Always)
{
    static readonly JsonSerializerOptions Options = new() { PropertyNameCaseInsensitive = true, ReadCommentHandling = JsonCommentHandling.Skip };

    public static WeightsManifest Load(string path)
    {
        try
        {
            return JsonSerializer.Deserialize<WeightsManifest>(File.ReadAllText(path), Options)
                   ?? throw new InvalidDataException("empty manifest");
        }
        catch (JsonException e) { throw new InvalidDataException($"{path}: invalid weights manifest: {e.Message}", e); }
    }

    public WeightFile this[string id] => Files.FirstOrDefault(f => f.Id == id)
        ?? throw new KeyNotFoundException($"weights manifest has no file with id '{id}'");

    /// <summary>The files a preset needs for a task ("sr", "face" or "denoise").</summary>
    public IReadOnlyList<WeightFile> FilesFor(string preset, string task)
    {
        if (!Presets.TryGetValue(preset, out var p))
            throw new KeyNotFoundException($"unknown preset '{preset}' (known: {string.Join(", ", Presets.Keys)})");
        if (!p.Cleaner.TryGetValue(task, out var cleaner) || !p.Controlnet.TryGetValue(task, out var control))
            throw new KeyNotFoundException($"preset '{preset}' has no task '{task}' (known: {string.Join(", ", p.Cleaner.Keys)})");
        return new[] { cleaner, p.Sd, control }.Concat(Always).Distinct().Select(id => this[id]).ToList();
    }

    /// <summary>Files of a preset/task that are not in <paramref name="folder"/>.</summary>
    public IReadOnlyList<WeightFile> Missing(string folder, string preset, string task) =>
        FilesFor(preset, task).Where(f => !System.IO.File.Exists(Path.Combine(folder, f.File))).ToList();
}
