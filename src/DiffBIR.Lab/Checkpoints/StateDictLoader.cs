using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Checkpoints;

/// <summary>What loading a state dict into a module found.</summary>
public sealed record LoadReport(
    IReadOnlyList<string> Missing,
    IReadOnlyList<string> Unexpected,
    IReadOnlyList<string> ShapeMismatches,
    int Loaded)
{
    public bool IsExact => Missing.Count == 0 && Unexpected.Count == 0 && ShapeMismatches.Count == 0;

    public string Describe(int maxPerList = 20)
    {
        static string List(string title, IReadOnlyList<string> xs, int n) =>
            xs.Count == 0 ? "" : $"\n  {title} ({xs.Count}): " + string.Join(", ", xs.Take(n)) + (xs.Count > n ? $", … {xs.Count - n} more" : "");
        return $"loaded {Loaded} tensors" + List("missing keys", Missing, maxPerList) + List("unexpected keys", Unexpected, maxPerList)
               + List("shape mismatches", ShapeMismatches, maxPerList);
    }
}

/// <summary>A strict load found missing or unexpected keys or wrong shapes; the message lists them by name.</summary>
public sealed class StateDictMismatchException : CheckpointException
{
    public LoadReport Report { get; }
    public StateDictMismatchException(string source, string module, LoadReport report)
        : base(source, $"does not fit {module}: {report.Describe()}") => Report = report;
}

/// <summary>
/// Loads a name → tensor map into a TorchSharp module, by the official <c>state_dict</c> key names (our field
/// names produce them, so there is no renaming table). Values are cast to each parameter's dtype and copied in place.
/// Strict by default, like <c>load_state_dict(strict=True)</c>; nothing is copied when a strict load fails.
/// </summary>
public static class StateDictLoader
{
    public static LoadReport Load(nn.Module module, IReadOnlyDictionary<string, Tensor> source, bool strict = true, string sourceName = "state dict")
    {
        var target = module.state_dict();
        var missing = target.Keys.Where(k => !source.ContainsKey(k)).ToList();
        var unexpected = source.Keys.Where(k => !target.ContainsKey(k)).ToList();
        var mismatched = new List<string>();
        foreach (var (k, t) in target)
        {
            if (!source.TryGetValue(k, out var s)) continue;
            if (!s.shape.SequenceEqual(t.shape))
                mismatched.Add($"{k}: checkpoint [{string.Join(", ", s.shape)}] vs model [{string.Join(", ", t.shape)}]");
        }
        var report = new LoadReport(missing, unexpected, mismatched, 0);
        if (strict && !report.IsExact) throw new StateDictMismatchException(sourceName, module.GetName(), report);
        if (mismatched.Count > 0) throw new StateDictMismatchException(sourceName, module.GetName(), report);
        int loaded = 0;
        using (torch.no_grad())
        {
            foreach (var (k, t) in target)
            {
                if (!source.TryGetValue(k, out var s)) continue;
                t.copy_(s.to(t.dtype, t.device));
                loaded++;
            }
        }
        return report with { Loaded = loaded };
    }

    /// <summary>Keys and shapes of a module's state dict, in registration order.</summary>
    public static IReadOnlyList<(string Key, long[] Shape)> Schema(nn.Module module) =>
        module.state_dict().Select(kv => (kv.Key, kv.Value.shape)).ToList();
}

/// <summary>
/// The one documented key mapping: a Stable Diffusion checkpoint holds the UNet, VAE and text encoder under
/// prefixes; ControlLDM names them unet / vae / clip (official <c>ControlLDM.load_pretrained_sd</c>).
/// </summary>
public static class SdCheckpointKeys
{
    public static readonly IReadOnlyList<(string SdPrefix, string Component)> Prefixes = new[]
    {
        ("model.diffusion_model.", "unet"),
        ("first_stage_model.", "vae"),
        ("cond_stage_model.", "clip"),
    };

    /// <summary>Maps one SD key to "component.key", or null when ControlLDM does not use it (EMA copies, schedules).</summary>
    public static string? Map(string sdKey)
    {
        foreach (var (p, c) in Prefixes)
            if (sdKey.StartsWith(p, StringComparison.Ordinal)) return c + "." + sdKey[p.Length..];
        return null;
    }

    /// <summary>Splits an SD state dict into the components' own key spaces; unused keys are returned separately.</summary>
    public static (Dictionary<string, Dictionary<string, Tensor>> Components, List<string> Unused) Split(IReadOnlyDictionary<string, Tensor> sd)
    {
        var comps = Prefixes.ToDictionary(p => p.Component, _ => new Dictionary<string, Tensor>(StringComparer.Ordinal));
        var unused = new List<string>();
        foreach (var (k, t) in sd)
        {
            var mapped = Map(k);
            if (mapped == null) { unused.Add(k); continue; }
            int dot = mapped.IndexOf('.');
            comps[mapped[..dot]][mapped[(dot + 1)..]] = t;
        }
        return (comps, unused);
    }
}
