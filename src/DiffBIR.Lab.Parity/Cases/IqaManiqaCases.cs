using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Metrics.Maniqa;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Parity.Cases;

/// <summary>
/// iqa/maniqa.safetensors: pyiqa MANIQA (reduced ViT / widths) on two images, one resized (48×64 → 225×300) and one
/// cropped directly (240×300): preprocessing, crop offsets, ViT blocks 6 / 9, both stages, per-token heads, score.
/// </summary>
public sealed class IqaManiqaCase : IParityCase
{
    public string Case => "maniqa";
    public string Description => "pyiqa MANIQA: resize + 20 uniform crops, ViT blocks 6..9, TABlocks, Swin, score / weight heads";

    /// <summary>
    /// Fallback only: every output gets <see cref="BandFactor"/> × its own float32-vs-float64 max_rel from the fixture's
    /// <c>tolerance</c> metadata (README: "compare each output with its own band"), never less than <see cref="MinRtol"/>.
    /// </summary>
    public Tolerance DefaultTolerance => new(1e-4, 0);
    public const double BandFactor = 4;
    /// <summary>A float32 port is entitled to a few ulps even where the reference band is ~0 (exact normalisation).</summary>
    public const double MinRtol = 1e-6;

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        using var model = new ManiqaMetric(ManiqaConfig.FromJson(f.Config!));
        model.LoadStateDict(f.Weights(), strict: true, sourceName: f.Path);
        var bands = f.MetaJson("tolerance")?["f32_vs_f64"]?.AsObject();
        var runs = f.Tensors.Keys.Where(k => k.StartsWith("in.", StringComparison.Ordinal) && k.EndsWith(".x", StringComparison.Ordinal))
            .Select(k => k[3..^2]).OrderBy(r => r, StringComparer.Ordinal).ToList();
        foreach (var r in runs)
        {
            var t = model.Trace(f.In($"{r}.x"));
            Tolerance Band(string name) =>
                bands?[$"{r}.{name}"]?["max_rel"] is JsonNode m ? new(Math.Max(BandFactor * (double)m, MinRtol), 0) : DefaultTolerance;
            CaseOutput Out(string name, Tensor actual) => new($"{r}.{name}", actual, Tolerance: Band(name));

            yield return Out("score", t.Score);
            if (f.Tensors.ContainsKey($"out.{r}.resized")) yield return Out("resized", t.Resized);
            yield return new CaseOutput($"{r}.crop_offsets", t.CropOffsets, Tolerance: new(0, 0));
            yield return Out("crop0", t.Crops.narrow(0, 0, 1));
            yield return Out("vit6_crop0", t.Vit6.narrow(0, 0, 1));
            yield return Out("vit9_crop0", t.Vit9.narrow(0, 0, 1));
            yield return Out("tab1_crop0", t.Tab1.narrow(0, 0, 1));
            yield return Out("conv1_crop0", t.Conv1.narrow(0, 0, 1));
            yield return Out("swin1_crop0", t.Swin1.narrow(0, 0, 1));
            yield return Out("tab2_crop0", t.Tab2.narrow(0, 0, 1));
            yield return Out("swin2", t.Swin2);
            yield return Out("per_patch_score", t.PerPatchScore);
            yield return Out("per_patch_weight", t.PerPatchWeight);
        }
    }
}

/// <summary>
/// iqa/schema/maniqa.json: the full-size MANIQA of the released <c>maniqa</c> metric (koniq, scale 0.8, timm
/// vit_base_patch8_224 incl. its unused head), built on the meta device, has exactly the official keys and shapes.
/// </summary>
public sealed class IqaManiqaSchemaCase : IqaSchemaCase
{
    public override string Case => "schema_maniqa";
    public override string Description => "full-size MANIQA state_dict keys and shapes (ViT-B/8 + 2 stages), built on the meta device";
    protected override string SummaryKey => "maniqa";
    protected override nn.Module Build() => new ManiqaMetric(ManiqaConfig.Koniq);
}
