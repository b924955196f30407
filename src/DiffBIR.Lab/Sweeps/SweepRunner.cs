using System.Diagnostics;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using DiffBIR.Lab.IO;
using DiffBIR.Lab.Metrics;
using DiffBIR.Lab.Pipeline;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Sweeps;

/// <summary>How a sweep runs (not what it sweeps): the shard, where metric weights are, progress and cancellation.</summary>
public sealed record SweepRunOptions
{
    public SweepShard Shard { get; init; } = SweepShard.All;
    /// <summary>Folder of metric weights (for <see cref="SweepSpec.Metrics"/> that need them).</summary>
    public string WeightsDir { get; init; } = "weights";
    /// <summary>Called after every point (and with the points skipped as already done, once, before the first).</summary>
    public Action<SweepProgress>? Progress { get; init; }
    public CancellationToken Cancellation { get; init; }
    /// <summary>The device name written into manifests.</summary>
    public string Device { get; init; } = "cpu";
    /// <summary>Consecutive points that differ only in their seed and guidance settings (scale, schedule, window, patch
    /// size, normalisation) run as one batch of up to this many through UNet and ControlNet (1: one at a time), each
    /// with its own seed and guidance. Batched results equal one-at-a-time ones up to the networks' batch arithmetic
    /// (float rounding).</summary>
    public int BatchSize { get; init; } = 1;
}

/// <summary>Where a sweep stands: points of this shard done (this run), skipped (done before), failed, total; the last row.</summary>
public sealed record SweepProgress(int Done, int Skipped, int Failed, int Total, TimeSpan Elapsed, TimeSpan? Remaining, SweepPoint? Point, JsonObject? Row);

/// <summary>What a sweep run did. <see cref="Rows"/> holds every row of the folder's table (earlier runs included).</summary>
public sealed record SweepSummary(int Points, int InShard, int Skipped, int Done, int Failed, bool Cancelled, string Folder, IReadOnlyList<JsonObject> Rows);

/// <summary>
/// Runs a sweep with a built preset pipeline: per input, the conditioning (stage 1, VAE encoder, CLIP) once for each
/// distinct set of conditioning options; per point, one sampling run, its metrics and one appended row of the
/// results table (<see cref="ResultsTable"/>) in the output folder, with the image and its manifest under images/.
/// Points already in the table are skipped, so a killed sweep resumes where it stopped; with a
/// <see cref="SweepShard"/> only that shard's points run.
/// </summary>
public static class SweepRunner
{
    static readonly string[] Leading = { "point_id", "index", "input", "hq", "preset", "task", "upscale", "precision" };

    /// <summary>The columns of the results table of <paramref name="spec"/>: ids and run settings, every option, then results.</summary>
    public static IReadOnlyList<string> Columns(SweepSpec spec) =>
        Leading.Concat(SweepOptions.Names)
            .Concat(new[] { "status", "psnr_hq", "ssim_hq", "psnr_irm", "ssim_irm" })
            .Concat(spec.Metrics.Select(MetricColumn))
            .Concat(new[] { "guidance_loss_last", "guided_steps", "seconds", "output", "manifest_sha256" })
            .ToArray();

    static string MetricColumn(string name) => Metric.Describe(name).NeedsReference ? name + "_hq" : name;

    /// <summary>Runs the points of <paramref name="spec"/> (of this shard) not yet in <paramref name="outDir"/>.</summary>
    public static SweepSummary Run(PresetPipeline preset, SweepSpec spec, string outDir, SweepRunOptions? options = null)
    {
        var ro = options ?? new SweepRunOptions();
        SweepSpecException Err(string field, string cause) => new(spec.Source, field, cause);
        if (spec.Preset is { } p && p != preset.Preset.Name) throw Err("preset", $"the spec asks for '{p}' but the pipeline is '{preset.Preset.Name}'");
        if (Presets.ParseTask(spec.Task) != preset.Task) throw Err("task", $"the spec asks for '{spec.Task}' but the pipeline was built for {preset.Task}");
        if (spec.EffectiveUpscale != preset.Upscale) throw Err("upscale", $"the spec asks for ×{spec.EffectiveUpscale} but the pipeline was built for ×{preset.Upscale}");

        // Everything that can be refused is refused before anything runs or is written.
        var points = SweepPlan.Expand(spec, preset.Preset.Name, preset.Preset.Defaults);
        var plans = new Dictionary<int, SizePlan>();
        for (int i = 0; i < spec.Inputs.Count; i++)
        {
            var input = spec.Inputs[i];
            var header = ReadHeader(input.Path, spec.Source, $"inputs[{i}]");
            var first = points.First(pt => pt.InputIndex == i).Options;
            SizePlan plan;
            try { plan = Presets.CheckSizes(preset.Preset, preset.Task, preset.Upscale, header.Height, header.Width, input.Path, first); }
            catch (SizeLimitException e) { throw Err($"inputs[{i}]", e.Message); }
            plans[i] = plan;
            if (input.Hq is { } hq)
            {
                var h = ReadHeader(hq, spec.Source, $"inputs[{i}].hq");
                if (h.Height != plan.Output.H || h.Width != plan.Output.W)
                    throw Err($"inputs[{i}].hq", $"{hq} is {h.Width}×{h.Height} px but the restored image is {plan.Output.W}×{plan.Output.H} px ({header.Width}×{header.Height} × {preset.Upscale}); give the reference at the output size");
            }
        }
        var metrics = spec.Metrics.Select(n => Metric.Get(n, ro.WeightsDir)).ToList();
        try
        {
            return RunPoints(preset, spec, outDir, ro, points, metrics);
        }
        finally
        {
            foreach (var m in metrics) m.Dispose();
        }
    }

    static ImageHeader ReadHeader(string path, string source, string field)
    {
        try { return ImageIO.Identify(path); }
        catch (Exception e) when (e is ImageFileException or IOException or UnauthorizedAccessException)
        {
            throw new SweepSpecException(source, field, e.Message);
        }
    }

    static SweepSummary RunPoints(PresetPipeline preset, SweepSpec spec, string outDir, SweepRunOptions ro, IReadOnlyList<SweepPoint> points, List<Metric> metrics)
    {
        var columns = Columns(spec);
        using var table = ResultsTable.Open(outDir, columns);
        var mine = points.Where(ro.Shard.Contains).ToList();
        var pending = mine.Where(pt => !table.Contains(pt.Id)).ToList();
        int skipped = mine.Count - pending.Count, done = 0, failed = 0;
        bool cancelled = false;
        var stems = InputStems(spec);
        var checkpoints = CheckpointHashes(preset);
        var started = DateTime.UtcNow;
        var sw = Stopwatch.StartNew();
        ro.Progress?.Invoke(new SweepProgress(0, skipped, 0, mine.Count, TimeSpan.Zero, null, null, null));
        var run = new JsonObject
        {
            ["preset"] = preset.Preset.Name, ["task"] = spec.Task, ["upscale"] = preset.Upscale, ["precision"] = spec.Precision,
        };

        try
        {
            foreach (var byInput in pending.GroupBy(pt => pt.InputIndex))
            {
                if (cancelled) break;
                var input = spec.Inputs[byInput.Key];
                using var loaded = ImageIO.Load(input.Path);
                // the official code feeds uint8 HWC; 8-bit sources round-trip exactly, 16-bit ones are rounded to 8 bits
                using var lq = ImageIO.ToUInt8(loaded.Image, Quantization.Round);
                using var hqLoaded = input.Hq is null ? null : ImageIO.Load(input.Hq);
                using var hq = hqLoaded is null ? null : ImageIO.FromUInt8(ImageIO.ToUInt8(hqLoaded.Image, Quantization.Round));
                foreach (var byCondition in byInput.GroupBy(pt => ConditionOptions.Of(pt.Options)))
                {
                    if (cancelled) break;
                    using var condition = preset.Condition(lq, byCondition.First().Options);
                    using var irm = IrmAtOutputSize(condition);
                    foreach (var batch in Batches(byCondition, ro.BatchSize))
                    {
                        if (ro.Cancellation.IsCancellationRequested) { cancelled = true; break; }
                        var rows = RunBatch(preset, spec, outDir, ro, run, batch, condition, hq, irm, metrics, columns, stems[batch[0].InputIndex], checkpoints);
                        if (rows is null) { cancelled = true; break; }
                        for (int n = 0; n < rows.Count; n++)
                        {
                            var row = rows[n];
                            table.Append(row);
                            if ((string?)row["status"] == "ok") done++; else failed++;
                            var elapsed = sw.Elapsed;
                            int finished = done + failed, remaining = pending.Count - finished;
                            ro.Progress?.Invoke(new SweepProgress(done, skipped, failed, mine.Count, elapsed,
                                TimeSpan.FromSeconds(elapsed.TotalSeconds / finished * remaining), batch[n], row));
                        }
                    }
                }
            }
        }
        catch (OperationCanceledException) { cancelled = true; }
        finally
        {
            var manifest = new JsonObject
            {
                ["spec"] = spec.ToJson(),
                ["spec_source"] = spec.Source,
                ["run"] = run.DeepClone(),
                ["shard"] = ro.Shard.ToString(),
                ["points_total"] = points.Count, ["points_in_shard"] = mine.Count,
                ["skipped"] = skipped, ["done"] = done, ["failed"] = failed, ["cancelled"] = cancelled,
                ["rows"] = table.Rows.Count,
                ["columns"] = new JsonArray(columns.Select(c => (JsonNode)c!).ToArray()),
                ["checkpoints"] = JsonSerializer.SerializeToNode(checkpoints),
                ["not_a_trained_model"] = preset.Pipeline.NotATrainedModel,
                ["versions"] = RunInfo.Manifest(ro.Device),
                ["started"] = started.ToString("o"), ["finished"] = DateTime.UtcNow.ToString("o"),
            };
            AtomicFile.WriteAllText(Path.Combine(outDir, "manifest.json"), manifest.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        }
        return new SweepSummary(points.Count, mine.Count, skipped, done, failed, cancelled, outDir, table.Rows.ToList());
    }

    /// <summary>
    /// Consecutive points (of one conditioning) that differ only in their seed and their per-sample guidance settings
    /// (scale, schedule, window, loss kind, patch size, normalisation), up to <paramref name="size"/> a batch: they run
    /// as one batch through UNet and ControlNet, each with its own seed (<see cref="Diffusion.BatchNoise"/>) and its
    /// own guidance (<see cref="Guidance.PerSampleGuidance"/>). Guided and unguided points, and points of another
    /// guidance space or repeat count, do not share a batch.
    /// </summary>
    static IEnumerable<List<SweepPoint>> Batches(IEnumerable<SweepPoint> points, int size)
    {
        var batch = new List<SweepPoint>();
        foreach (var p in points)
        {
            if (batch.Count > 0 && (batch.Count >= size || BatchKey(batch[0].Settings) != BatchKey(p.Settings)))
            {
                yield return batch;
                batch = new List<SweepPoint>();
            }
            batch.Add(p);
        }
        if (batch.Count > 0) yield return batch;
    }

    /// <summary>The settings with everything a batch may vary per sample blanked out.</summary>
    public static SweepSettings BatchKey(SweepSettings s) => s with
    {
        Seed = 0, GScale = 0, GPatch = 0, GNorm = "", GSchedule = "", GStart = 0, GStop = 0,
        Guidance = s.Guidance == "none" ? "none" : "guided",
    };

    /// <summary>
    /// One batch of points (usually one): sample, then per point its metrics, image, manifest and row; null when
    /// cancelled (nothing written). In a batch each point has its own guidance (<see cref="Guidance.PerSampleGuidance"/>),
    /// whose per-sample losses fill each row's guidance_loss_last and each manifest's guidance_steps.
    /// </summary>
    static List<JsonObject>? RunBatch(PresetPipeline preset, SweepSpec spec, string outDir, SweepRunOptions ro, JsonObject run, List<SweepPoint> batch,
        ConditionedInput condition, Tensor? hq, Tensor irm, List<Metric> metrics, IReadOnlyList<string> columns, string stem,
        IReadOnlyDictionary<string, string> checkpoints)
    {
        var options = batch[0].Options;
        var perSample = batch.Count > 1 && options.Guidance is not null
            ? new Guidance.PerSampleGuidance(batch.Select(p => p.Options.Guidance!)) : null;
        if (perSample is not null) options = options with { Guidance = perSample };
        var guided = batch.Select(_ => new JsonArray()).ToArray();
        var sw = Stopwatch.StartNew();
        var rows = new List<JsonObject>();
        foreach (var point in batch)
        {
            var row = new JsonObject();
            foreach (var c in columns) row[c] = null;
            row["point_id"] = point.Id; row["index"] = point.Index; row["input"] = point.Input.Path; row["hq"] = point.Input.Hq;
            foreach (var (k, v) in run) row[k] = v?.DeepClone();
            foreach (var (k, v) in point.Settings.ToJson()) row[k] = v?.DeepClone();
            rows.Add(row);
        }
        using var noise = batch.Count > 1 ? new Diffusion.BatchNoise(batch.Select(p => p.Settings.Seed).ToArray()) : null;
        using var batched = batch.Count > 1 ? condition.Repeat(batch.Count) : null;
        try
        {
            using var scope = torch.NewDisposeScope();
            RestorationResult result;
            try
            {
                result = preset.Sample(batched ?? condition, noise is null ? options : options with { Noise = noise }, stepObserver: info =>
                {
                    if (!info.GuidanceApplied) return true;
                    if (perSample is not null)
                    {
                        var losses = perSample.TakeSampleLosses();
                        for (int n = 0; n < batch.Count; n++)
                            if (losses[n] is { } l)
                                guided[n].Add(new JsonObject { ["step"] = info.Step, ["t"] = info.Timestep, ["scale"] = perSample.Members[n].ScaleAt(info.Timestep), ["loss"] = l });
                    }
                    else if (options.Guidance is { } g)
                        guided[0].Add(new JsonObject { ["step"] = info.Step, ["t"] = info.Timestep, ["scale"] = g.ScaleAt(info.Timestep), ["loss"] = info.GuidanceLoss });
                    return true;
                }, cancellation: ro.Cancellation);
            }
            catch (OperationCanceledException) { return null; }
            using var _r = result;
            double seconds = sw.Elapsed.TotalSeconds / batch.Count;
            var images = result.Image.cpu();
            for (int n = 0; n < batch.Count; n++)
            {
                var (point, row) = (batch[n], rows[n]);
                var image = images.narrow(0, n, 1);
                var x = ImageIO.FromUInt8(image);
                if (hq is not null)
                {
                    row["psnr_hq"] = ImageMetrics.Psnr(x, hq).item<double>();
                    row["ssim_hq"] = ImageMetrics.Ssim(x, hq).item<double>();
                }
                row["psnr_irm"] = ImageMetrics.Psnr(x, irm).item<double>();
                row["ssim_irm"] = ImageMetrics.Ssim(x, irm).item<double>();
                foreach (var m in metrics)
                {
                    if (!m.Info.NeedsReference) row[m.Name] = m.Score(image)[0];
                    else if (hq is not null) row[m.Name + "_hq"] = m.Score(image, hq)[0];
                }
                var steps = perSample is null ? guided[0] : guided[n];
                row["guidance_loss_last"] = steps.LastOrDefault()?["loss"]?.DeepClone();
                row["guided_steps"] = steps.Count;
                row["seconds"] = Math.Round(seconds, 3);
                row["status"] = "ok";
                if (!spec.SaveImages) continue;
                var rel = Path.Combine("images", stem, point.Id + ".png");
                var png = Path.Combine(outDir, rel);
                ImageIO.Save(png, image);
                var manifest = new JsonObject
                {
                    ["point_id"] = point.Id,
                    ["output"] = Path.GetFileName(png),
                    ["output_sha256"] = SweepPlan.Sha256(png),
                    ["input"] = point.Input.Path, ["input_sha256"] = point.InputSha256,
                    ["hq"] = point.Input.Hq, ["hq_sha256"] = point.HqSha256,
                    ["run"] = run.DeepClone(),
                    ["settings"] = point.Settings.ToJson(),
                    ["seed"] = point.Settings.Seed,
                    ["batch"] = batch.Count,
                    // per guided step the scale in effect, s·f(t), and this point's loss
                    ["guidance_steps"] = steps.DeepClone(),
                    ["notes"] = new JsonArray(result.Notes.Select(t => (JsonNode)t!).ToArray()),
                    ["checkpoints"] = JsonSerializer.SerializeToNode(checkpoints),
                    ["not_a_trained_model"] = result.NotATrainedModel,
                    ["versions"] = RunInfo.Manifest(ro.Device, point.Settings.Seed),
                };
                var text = manifest.ToJsonString(new JsonSerializerOptions { WriteIndented = true });
                AtomicFile.WriteAllText(Path.ChangeExtension(png, ".json"), text);
                row["output"] = rel;
                row["manifest_sha256"] = Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(text)));
            }
        }
        catch (NonFiniteException e)
        {
            // a diverging setting (huge cfg or guidance scale) is a result of the sweep, not a reason to stop it
            foreach (var row in rows)
            {
                row["status"] = "non-finite: " + e.Message;
                row["seconds"] = Math.Round(sw.Elapsed.TotalSeconds / batch.Count, 3);
                row["guided_steps"] = (perSample is null ? guided[0] : guided[rows.IndexOf(row)]).Count;
            }
        }
        return rows;
    }

    /// <summary>I_RM at the output size (bicubic antialiased, as <see cref="ImageOps.Finish"/> resizes), float NCHW on the CPU.</summary>
    static Tensor IrmAtOutputSize(ConditionedInput c)
    {
        using var scope = torch.NewDisposeScope();
        var s = c.Stage1;
        if (s.shape[2] != c.OutputSize.H || s.shape[3] != c.OutputSize.W) s = ImageOps.ResizeBicubic(s, c.OutputSize.H, c.OutputSize.W);
        return s.clamp(0, 1).cpu().MoveToOuterDisposeScope();
    }

    /// <summary>images/ subfolder per input: its file stem, with the input's index where two inputs share a stem.</summary>
    static IReadOnlyList<string> InputStems(SweepSpec spec)
    {
        var stems = spec.Inputs.Select(i => Path.GetFileNameWithoutExtension(i.Path)).ToList();
        return stems.Select((s, i) => stems.Count(x => string.Equals(x, s, StringComparison.OrdinalIgnoreCase)) > 1 ? $"{s}_{i}" : s).ToList();
    }

    static IReadOnlyDictionary<string, string> CheckpointHashes(PresetPipeline preset)
    {
        var result = new SortedDictionary<string, string>(StringComparer.Ordinal);
        foreach (var path in preset.CheckpointPaths) result[Path.GetFileName(path)] = SweepPlan.Sha256(path);
        if (result.Count == 0) result["(none)"] = preset.Pipeline.NotATrainedModel ? "random weights (tiny preset, seeded)" : "none";
        return result;
    }
}
