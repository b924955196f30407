using System.Globalization;
using System.Text;
using DiffBIR.Lab.Data;
using DiffBIR.Lab.Guidance;
using DiffBIR.Lab.IO;
using DiffBIR.Lab.Metrics;
using DiffBIR.Lab.Metrics.Niqe;
using DiffBIR.Lab.Pipeline;
using DiffBIR.Lab.Sampling;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Training;

/// <summary>Settings of <see cref="TinyRecipeEvaluation.Run"/>.</summary>
public sealed record TinyEvaluationOptions
{
    /// <summary>Held-out images (procedural indices <see cref="TinyTrainingData.HeldOutStart"/> on).</summary>
    public int Images { get; init; } = 16;
    /// <summary>The data seed of the recipe (the family and the degradations of the held-out set).</summary>
    public long DataSeed { get; init; } = 2026;
    public int Size { get; init; } = 128;
    /// <summary>Guidance scales s of the sweep (paper units; MSE guidance in RGB space, the official default).</summary>
    public double[] GuidanceScales { get; init; } = { 0, 0.01, 0.1, 1 };
    /// <summary>Images of the per-sampler guidance sweep (the first of the held-out set).</summary>
    public int SweepImages { get; init; } = 2;
    /// <summary>Samplers of the sweep (default: every name of <see cref="Samplers.Names"/>).</summary>
    public IReadOnlyList<string>? SweepSamplers { get; init; }
    /// <summary>Rows of the image grid (LQ, stage 1, stage 2 s = 0, stage 2 at the largest s, HQ).</summary>
    public int GridRows { get; init; } = 4;
    public long Seed { get; init; } = 231;
    /// <summary>Sampler of the main measurements (null: the preset's default).</summary>
    public string? Sampler { get; init; }
}

/// <summary>
/// Acceptance measurements of the trained tiny DiffBIR on held-out procedural images degraded with Eq. 2 (the recipe's
/// degradation): PSNR/SSIM of the pipeline, stage 1, the degraded input and a bicubic baseline against HQ; how far
/// stage 2 moves from stage 1 and whether it adds detail (high-frequency energy); the sharpness of the decoded x̂₀ at
/// each step; and, for every sampler, the distance of the result to I_RM (the stage-1 output) as the restoration
/// guidance scale s grows. Returns a markdown report; optionally writes the image grid.
/// </summary>
public static class TinyRecipeEvaluation
{
    /// <summary>Mean |Laplacian| of the luma (×255): a simple high-frequency ("detail") energy.</summary>
    public static double Detail(Tensor nchw)
    {
        using var scope = NewDisposeScope();
        var y = ImageMetrics.RgbToY(nchw.to(ScalarType.Float64));
        if (y.dim() == 3) y = y.unsqueeze(1);
        var k = tensor(new double[] { 0, 1, 0, 1, -4, 1, 0, 1, 0 }, new long[] { 1, 1, 3, 3 }, ScalarType.Float64);
        return nn.functional.conv2d(y, k).abs().mean().item<double>() * 255;
    }

    static string F(double x, string fmt = "F2") => x.ToString(fmt, CultureInfo.InvariantCulture);

    public static string Run(PresetPipeline preset, TinyEvaluationOptions? options = null, string? gridPng = null, Action<string>? log = null)
    {
        var o = options ?? new TinyEvaluationOptions();
        log ??= _ => { };
        var sb = new StringBuilder();
        var baseOptions = preset.Preset.Defaults with { Seed = o.Seed };
        if (o.Sampler != null) baseOptions = baseOptions with { Sampler = o.Sampler };
        double sMax = o.GuidanceScales.Max();
        var rows = new List<Tensor[]>();
        var acc = new Dictionary<string, (double Psnr, double Ssim)>();
        void Add(string k, Tensor a, Tensor hq)
        {
            using var p = ImageMetrics.Psnr(a, hq); using var s = ImageMetrics.Ssim(a, hq);
            var (ps, ss) = acc.GetValueOrDefault(k);
            acc[k] = (ps + p.mean().item<double>(), ss + s.mean().item<double>());
        }
        double dStage2Stage1 = 0, detailS1 = 0, detailS2 = 0, detailHq = 0, detailG = 0;
        // niqe-lab (weight-free NIQE fitted on the project's HQ images; lower is better), when its model is found.
        using var niqe = NiqeLab.FindModel() is null ? null : Metric.Get(Metric.NiqeLabName);
        var niqeSum = new Dictionary<string, double>();
        void AddNiqe(string k, Tensor img) { if (niqe != null) niqeSum[k] = niqeSum.GetValueOrDefault(k) + niqe.Score(img)[0]; }
        var x0Detail = new double[baseOptions.Steps];
        var x0Psnr = new double[baseOptions.Steps];
        for (int i = 0; i < o.Images; i++)
        {
            using var scope = NewDisposeScope();
            long index = TinyTrainingData.HeldOutStart + i;
            var hq = ProceduralImages.Generate(o.DataSeed, index, o.Size).unsqueeze(0);
            var (lq, sh, sw) = TinyTrainingData.DegradeWithSize(hq.squeeze(0), o.DataSeed, index);
            lq = lq.unsqueeze(0);
            var lqU8 = ImageIO.ToUInt8(lq, Quantization.Round);
            var lqF = ImageIO.FromUInt8(lqU8);
            var bicubic = ImageOps.ResizeBicubic(
                Degradation.FirstOrderDegradation.ResizeBilinear(lqF, sh, sw), o.Size, o.Size).clamp(0, 1);

            int step = 0;
            preset.Pipeline.StepObserver = info =>
            {
                using var _ = no_grad();
                using var x0 = preset.Pipeline.Cldm.VaeDecode(info.PredictedX0);
                using var img = ((x0 + 1) / 2).clamp(0, 1);
                if (step < x0Detail.Length)
                {
                    x0Detail[step] += Detail(img);
                    using var p = ImageMetrics.Psnr(img, hq);
                    x0Psnr[step] += p.mean().item<double>();
                }
                step++;
                return true;
            };
            Tensor s1, s2, s2g;
            using (var r = preset.Restore(lqU8, baseOptions)) { s1 = r.Stage1.clamp(0, 1); s2 = ImageIO.FromUInt8(r.Image); }
            preset.Pipeline.StepObserver = null;
            // Every s > 0 of the sweep in the PSNR table (the quality–fidelity curve); the largest goes into the grid.
            var guided = new List<(double S, Tensor Image)>();
            foreach (var sc in o.GuidanceScales.Where(v => v > 0).Order())
                using (var r = preset.Restore(lqU8, baseOptions with { Guidance = new MseGuidance { Scale = sc } })) guided.Add((sc, ImageIO.FromUInt8(r.Image)));
            s2g = guided.Count > 0 ? guided[^1].Image : s2;
            Add("degraded input (Eq. 2 LQ)", lqF, hq);
            // Two references for what the f8 latent can hold: the VAE round trip of HQ itself, and HQ reduced to the
            // mean of each 8×8 block (3 numbers per block; the latent has 4) and brought back bicubically.
            using (no_grad())
            {
                var cldm = preset.Pipeline.Cldm;
                Add("VAE round trip of HQ (decode(mode(encode)))", ((cldm.VaeDecode(cldm.VaeEncode(hq * 2 - 1)) + 1) / 2).clamp(0, 1), hq);
            }
            Add("HQ as 8×8 block means, bicubic up", ImageOps.ResizeBicubic(nn.functional.avg_pool2d(hq, 8), o.Size, o.Size).clamp(0, 1), hq);
            Add("bicubic (LQ at its ⌊H/r⌋ size, bicubic up)", bicubic, hq);
            Add("stage 1 (SwinIR)", s1, hq);
            Add("stage 2, s = 0", s2, hq);
            foreach (var (sc, img) in guided) Add($"stage 2, s = {F(sc, "G")}", img, hq);
            using (var d = ImageMetrics.Psnr(s2, s1)) dStage2Stage1 += d.mean().item<double>();
            detailS1 += Detail(s1); detailS2 += Detail(s2); detailHq += Detail(hq); detailG += Detail(s2g);
            AddNiqe("degraded input", lqF); AddNiqe("stage 1", s1); AddNiqe("stage 2, s = 0", s2); AddNiqe($"stage 2, s = {F(sMax, "G")}", s2g); AddNiqe("HQ", hq);
            if (rows.Count < o.GridRows)
                rows.Add(new[] { lqF, s1, s2, s2g, hq }.Select(t => t.detach().clone().MoveToOuterDisposeScope()).ToArray());
            log($"eval image {i + 1}/{o.Images}");
        }
        int n = o.Images;
        sb.AppendLine($"Held-out procedural images {TinyTrainingData.HeldOutStart}…{TinyTrainingData.HeldOutStart + n - 1} ({o.Size} px), " +
                      $"Eq. 2 degradation of the recipe; pipeline: preset tiny, task sr, ×1, {baseOptions.Sampler} {baseOptions.Steps} steps, cfg {F(baseOptions.CfgScale, "G")}, seed {o.Seed}.");
        sb.AppendLine();
        sb.AppendLine("| image vs HQ | PSNR (dB) | SSIM |");
        sb.AppendLine("| --- | --- | --- |");
        foreach (var (k, v) in acc) sb.AppendLine($"| {k} | {F(v.Psnr / n)} | {F(v.Ssim / n, "F4")} |");
        sb.AppendLine();
        sb.AppendLine($"Stage 2 (s = 0) vs stage 1: PSNR {F(dStage2Stage1 / n)} dB between them. Detail (mean |Laplacian| of luma, ×255): " +
                      $"stage 1 {F(detailS1 / n)}, stage 2 {F(detailS2 / n)}, stage 2 at s = {F(sMax, "G")} {F(detailG / n)}, HQ {F(detailHq / n)}.");
        sb.AppendLine();
        if (niqe != null)
        {
            sb.AppendLine("niqe-lab (NIQE with the pristine model fitted on the project's own HQ images, 32-px blocks; lower is better):");
            sb.AppendLine();
            sb.AppendLine("| " + string.Join(" | ", niqeSum.Keys) + " |");
            sb.AppendLine("| " + string.Join(" | ", niqeSum.Keys.Select(_ => "---")) + " |");
            sb.AppendLine("| " + string.Join(" | ", niqeSum.Values.Select(v => F(v / n))) + " |");
            sb.AppendLine();
        }
        else sb.AppendLine("niqe-lab: not measured (weights/niqe_lab.safetensors not found).").AppendLine();
        sb.AppendLine("Decoded x̂₀ per sampling step (mean over the images): detail / PSNR vs HQ:");
        sb.AppendLine();
        sb.AppendLine("| step | " + string.Join(" | ", Enumerable.Range(1, x0Detail.Length)) + " |");
        sb.AppendLine("| --- | " + string.Join(" | ", x0Detail.Select(_ => "---")) + " |");
        sb.AppendLine("| detail | " + string.Join(" | ", x0Detail.Select(d => F(d / n))) + " |");
        sb.AppendLine("| PSNR | " + string.Join(" | ", x0Psnr.Select(d => F(d / n))) + " |");
        sb.AppendLine();

        void gridAndReturn()
        {
            if (gridPng != null && rows.Count > 0)
            {
                using var grid = cat(rows.Select(r => cat(r, 3)).ToArray(), 2);
                Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(gridPng))!);
                ImageIO.Save(gridPng, grid, Quantization.Round);
                foreach (var t in rows.SelectMany(r => r)) t.Dispose();
            }
        }

        // Guidance sweep: MSE(result, I_RM) for every sampler and s; monotone when it never grows with s.
        var samplers = o.SweepSamplers ?? Samplers.Names.ToList();
        if (samplers.Count == 0) { gridAndReturn(); return sb.ToString(); }
        sb.AppendLine($"Restoration guidance (MSE, RGB space), MSE(result, I_RM) ×10³ over the first {o.SweepImages} image(s), {baseOptions.Steps} steps:");
        sb.AppendLine();
        sb.AppendLine("| sampler | " + string.Join(" | ", o.GuidanceScales.Select(s => $"s = {F(s, "G")}")) + " | monotone |");
        sb.AppendLine("| --- | " + string.Join(" | ", o.GuidanceScales.Select(_ => "---")) + " | --- |");
        int monotone = 0;
        foreach (var name in samplers)
        {
            var d = new double[o.GuidanceScales.Length];
            for (int i = 0; i < o.SweepImages; i++)
            {
                using var scope = NewDisposeScope();
                long index = TinyTrainingData.HeldOutStart + i;
                var hq = ProceduralImages.Generate(o.DataSeed, index, o.Size);
                var lqU8 = ImageIO.ToUInt8(TinyTrainingData.DegradeWithSize(hq, o.DataSeed, index).Lq.unsqueeze(0), Quantization.Round);
                for (int k = 0; k < o.GuidanceScales.Length; k++)
                {
                    var opt = baseOptions with { Sampler = name, Guidance = o.GuidanceScales[k] > 0 ? new MseGuidance { Scale = o.GuidanceScales[k] } : null };
                    using var r = preset.Restore(lqU8, opt);
                    using var img = ImageIO.FromUInt8(r.Image);
                    using var mse = (img - r.Stage1.clamp(0, 1)).square().mean();
                    d[k] += mse.item<float>() / o.SweepImages;
                }
            }
            bool mono = d.Zip(d.Skip(1)).All(p => p.Second <= p.First);
            if (mono) monotone++;
            sb.AppendLine($"| {name} | " + string.Join(" | ", d.Select(v => F(v * 1000, "F3"))) + $" | {(mono ? "yes" : "**no**")} |");
            log($"guidance sweep: {name}");
        }
        sb.AppendLine();
        sb.AppendLine($"Monotone in s for {monotone} of {samplers.Count} samplers.");

        gridAndReturn();
        return sb.ToString();
    }
}
