using System.ComponentModel;
using System.Globalization;
using System.Security.Cryptography;
using System.Text.Json;
using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Diffusion;
using DiffBIR.Lab.Guidance;
using DiffBIR.Lab.IO;
using DiffBIR.Lab.Pipeline;
using Spectre.Console;
using Spectre.Console.Cli;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Cli.Commands;

public sealed class RestoreSettings : CommandSettings
{
    [CommandOption("-i|--input <PATH>")] [Description("An image file or a folder of images (PNG, JPEG, BMP, TIFF, WebP).")]
    public string Input { get; set; } = "";
    [CommandOption("-o|--output <DIR>")] [Description("Where restored images and their manifests go.")]
    public string Output { get; set; } = "";
    [CommandOption("--task <TASK>")] [Description("sr (blind super-resolution), face (aligned faces) or denoise. Default sr.")]
    public string Task { get; set; } = "sr";
    [CommandOption("--version|--preset <PRESET>")] [Description("v1, v2, v2.1, tiny (trained on procedural images, weights/tiny), tiny-random or custom. Default: v2.1 when its weights are present, else tiny.")]
    public string? Preset { get; set; }
    [CommandOption("--upscale <X>")] [Description("Output scale relative to the input (default 4 for sr, 1 otherwise).")]
    public double? Upscale { get; set; }
    [CommandOption("--weights <DIR>")] [Description("The weights folder (default weights/).")]
    public string Weights { get; set; } = "weights";
    [CommandOption("--sd-ckpt <FILE>")] [Description("custom preset: the Stable Diffusion checkpoint.")]
    public string? SdCkpt { get; set; }
    [CommandOption("--cleaner-ckpt <FILE>")] [Description("custom preset: the stage-1 checkpoint (SwinIR).")]
    public string? CleanerCkpt { get; set; }
    [CommandOption("--controlnet-ckpt <FILE>")] [Description("custom preset: the IRControlNet checkpoint.")]
    public string? ControlNetCkpt { get; set; }

    // Every pipeline knob below is null (or off) unless given: the preset's defaults (Preset.Defaults) hold the rest.
    [CommandOption("--sampler <NAME>")] [Description("spaced, ddim, dpm++_m2, edm_euler, edm_euler_a, edm_heun, edm_dpm_2, edm_dpm_2_a, edm_lms, edm_dpm++_2s_a, edm_dpm++_sde, edm_dpm++_2m, edm_dpm++_2m_sde, edm_dpm++_3m_sde (default: the preset's — edm_dpm++_3m_sde, the official default; tiny ddim).")]
    public string? Sampler { get; set; }
    [CommandOption("--steps <N>")] [Description("Sampling steps (default: the preset's — 10, the official default; tiny-random 2).")]
    public int? Steps { get; set; }
    [CommandOption("--cfg <SCALE>")] [Description("Classifier-free guidance scale (default: the preset's — 6, the official default; tiny 1).")]
    public double? Cfg { get; set; }
    [CommandOption("--rescale-cfg")] public bool RescaleCfg { get; set; }
    [CommandOption("--pos-prompt <TEXT>")] [Description("Positive prompt (default: the preset's — the official one; tiny \"\", it has no text conditioning).")]
    public string? PosPrompt { get; set; }
    [CommandOption("--neg-prompt <TEXT>")] [Description("Negative prompt (default: the preset's — the official one; tiny \"\").")]
    public string? NegPrompt { get; set; }
    [CommandOption("--strength <S>")] [Description("Control strength (default 1).")]
    public double? Strength { get; set; }
    [CommandOption("--noise-aug <T>")] public int? NoiseAug { get; set; }
    [CommandOption("--start-point <KIND>")] [Description("noise (default), cond, or low_frequency (the paper version's better start).")]
    public string? StartPoint { get; set; }
    [CommandOption("--s-churn <X>")] public double? SChurn { get; set; }
    [CommandOption("--s-tmin <X>")] public double? STmin { get; set; }
    [CommandOption("--s-tmax <X>")] public double? STmax { get; set; }
    [CommandOption("--s-noise <X>")] public double? SNoise { get; set; }
    [CommandOption("--eta <X>")] public double? Eta { get; set; }
    [CommandOption("--order <N>")] public int? Order { get; set; }

    [CommandOption("--guidance <KIND>")] [Description("Restoration guidance: none (default), mse or wmse (region-adaptive, W = 1 − G(I_RM)).")]
    public string Guidance { get; set; } = "none";
    [CommandOption("--g-scale <S>")] [Description("Guidance scale s (official convention: the gradient is multiplied by s·3000).")]
    public double GScale { get; set; } = 0.0;
    [CommandOption("--g-start <T>")] public int GStart { get; set; } = 1001;
    [CommandOption("--g-stop <T>")] public int GStop { get; set; } = -1;
    [CommandOption("--g-space <SPACE>")] [Description("rgb (default) or latent.")]
    public string GSpace { get; set; } = "rgb";
    [CommandOption("--g-repeat <N>")] public int GRepeat { get; set; } = 1;
    [CommandOption("--g-patch <P>")] [Description("Gradient-map patch size for wmse (official 2).")]
    public int GPatch { get; set; } = 2;
    [CommandOption("--g-norm <NAME[:P]>")] [Description("Gradient-map normalisation for wmse: sum (official: tanh of the patch sum), sum:T (tanh(sum/T)), mean (patch mean), max (sum / the image's largest patch sum) or percentile:Q (sum / the image's Q-th percentile).")]
    public string GNorm { get; set; } = "sum";
    [CommandOption("--g-schedule <SPEC>")] [Description("A factor f(t) of --g-scale (the scale in effect is s·f(t)): constant (default, f = 1), linear:A:B, cosine:A:B (A at t=999, B at t=0) or piecewise:T=F,T=F,…")]
    public string GSchedule { get; set; } = "constant";

    [CommandOption("--cleaner-tiled")] public bool CleanerTiled { get; set; }
    [CommandOption("--cleaner-tile-size <N>")] public int? CleanerTileSize { get; set; }
    [CommandOption("--cleaner-tile-stride <N>")] public int? CleanerTileStride { get; set; }
    [CommandOption("--vae-encoder-tiled")] public bool VaeEncoderTiled { get; set; }
    [CommandOption("--vae-encoder-tile-size <N>")] public int? VaeEncoderTileSize { get; set; }
    [CommandOption("--vae-decoder-tiled")] public bool VaeDecoderTiled { get; set; }
    [CommandOption("--vae-decoder-tile-size <N>")] public int? VaeDecoderTileSize { get; set; }
    [CommandOption("--vae-tiling <KIND>")] [Description("shared_group_norm (HEAD's tiled VAE, default) or gaussian_blend (the paper version's: tiles encoded / decoded alone and blended).")]
    public string? VaeTiling { get; set; }
    [CommandOption("--vae-tile-stride <N>")] [Description("gaussian_blend: pixels between VAE tiles (default 256).")]
    public int? VaeTileStride { get; set; }
    [CommandOption("--pad-multiple <N>")] [Description("Pad the condition image to a multiple of N px (default: HEAD's rule, 64 or 8 when tiled; the paper version 64).")]
    public int? PadMultiple { get; set; }
    [CommandOption("--cldm-tiled")] public bool CldmTiled { get; set; }
    [CommandOption("--cldm-tile-size <N>")] public int? CldmTileSize { get; set; }
    [CommandOption("--cldm-tile-stride <N>")] public int? CldmTileStride { get; set; }

    [CommandOption("--precision <P>")] [Description("fp32 (default), fp16 or bf16.")]
    public string Precision { get; set; } = "fp32";
    [CommandOption("--device <D>")] [Description("cpu (default) or cuda.")]
    public string Device { get; set; } = "cpu";
    [CommandOption("--seed <N>")] public long Seed { get; set; } = 231;
    [CommandOption("--n-samples <N>")] [Description("Restorations per image (seeds seed, seed+1, …).")]
    public int NSamples { get; set; } = 1;
    [CommandOption("--batch-size <N>")] [Description("Images (and samples) of one size restored together through stage 2 (default 1). Each keeps its own seed, so a batched output equals its one-at-a-time run up to float rounding (≤ 1 level seen).")]
    public int BatchSize { get; set; } = 1;
    [CommandOption("--force")] [Description("Re-run even when an output with the same manifest exists.")]
    public bool Force { get; set; }

    [CommandOption("--threads <N>")] [Description("CPU threads of libtorch (default: all cores). Fixed for the run and recorded in every manifest, so reruns are bit-identical.")]
    public int? Threads { get; set; }

    public override ValidationResult Validate()
    {
        if (string.IsNullOrWhiteSpace(Input)) return ValidationResult.Error("--input is required");
        if (string.IsNullOrWhiteSpace(Output)) return ValidationResult.Error("--output is required");
        if (NSamples < 1 || NSamples > 10000) return ValidationResult.Error($"--n-samples: must be in 1..10000 (got {NSamples})");
        if (BatchSize < 1) return ValidationResult.Error($"--batch-size: must be ≥ 1 (got {BatchSize})");
        if (Threads is < 1 or > 1024) return ValidationResult.Error($"--threads: must be in 1..1024 (got {Threads})");
        if (Upscale is { } u && (!double.IsFinite(u) || u <= 0)) return ValidationResult.Error($"--upscale: must be a finite number above 0 (got {u})");
        if (!double.IsFinite(GScale)) return ValidationResult.Error($"--g-scale: must be a finite number (got {GScale})");
        if (Seed < 0 || Seed + NSamples - 1 > DiffBIR.Lab.Pipeline.PipelineChecks.MaxSeed)
            return ValidationResult.Error($"--seed: {Seed} with --n-samples {NSamples} uses seeds up to {Seed + NSamples - 1}; the official range is 0..{DiffBIR.Lab.Pipeline.PipelineChecks.MaxSeed}");
        if (Task is not ("sr" or "face" or "denoise")) return ValidationResult.Error($"--task: must be sr, face or denoise (got '{Task}')");
        if (Guidance is not ("none" or "mse" or "wmse")) return ValidationResult.Error("--guidance: must be none, mse or wmse");
        if (GSpace is not ("rgb" or "latent")) return ValidationResult.Error("--g-space: must be rgb or latent");
        if (VaeTiling is not (null or "shared_group_norm" or "gaussian_blend")) return ValidationResult.Error("--vae-tiling: must be shared_group_norm or gaussian_blend");
        if (StartPoint is not (null or "noise" or "cond" or "low_frequency")) return ValidationResult.Error("--start-point: must be noise, cond or low_frequency");
        try { WeightMapNorm.Parse(GNorm); }
        catch (FormatException e) { return ValidationResult.Error($"--g-norm: {e.Message}"); }
        if (Precision is not ("fp32" or "fp16" or "bf16")) return ValidationResult.Error("--precision: must be fp32, fp16 or bf16");
        if (Device is not ("cpu" or "cuda")) return ValidationResult.Error("--device: must be cpu or cuda");
        return ValidationResult.Success();
    }
}

/// <summary>
/// <c>diffbir-lab restore</c>: restores an image or a folder with any preset and every official knob. Each output
/// gets a JSON manifest beside it (settings, seed, preset, SHA-256 of every checkpoint and of the input, versions,
/// device, time); an output whose manifest matches is skipped on a re-run; Ctrl+C stops after the current step and
/// leaves no partial file (every write is a temporary file renamed into place).
/// </summary>
public sealed class RestoreCommand : Command<RestoreSettings>
{
    static readonly string[] ImageExtensions = { ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp" };

    public override int Execute(CommandContext context, RestoreSettings s, CancellationToken ct)
    {
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        ConsoleCancelEventHandler onCancel = (_, e) => { e.Cancel = true; cts.Cancel(); AnsiConsole.MarkupLine("[yellow]stopping after the current step…[/]"); };
        Console.CancelKeyPress += onCancel;
        try { return Run(s, cts.Token); }
        finally { Console.CancelKeyPress -= onCancel; }
    }

    static IReadOnlyList<string> Inputs(string input)
    {
        if (Directory.Exists(input))
            return Directory.EnumerateFiles(input).Where(f => ImageExtensions.Contains(Path.GetExtension(f).ToLowerInvariant()))
                .OrderBy(f => f, StringComparer.Ordinal).ToList();
        if (File.Exists(input)) return new[] { input };
        throw new FileNotFoundException($"-i {input}: no such file or folder");
    }

    /// <summary>Only regular, non-empty files are read: a device (/dev/zero), FIFO or socket would block or never end.</summary>
    static void CheckRegularFile(string file)
    {
        var info = new FileInfo(file);
        if (info.Length == 0 || info.Attributes.HasFlag(FileAttributes.Device))
            throw new ImageFileException(file, "empty, or not a regular file (a device, FIFO or socket); give an image file");
    }

    /// <summary>
    /// Output stems, unique and stable: an input's name without its extension, except where two inputs share it
    /// (a.png and a.jpg), where each keeps its extension (a_png, a_jpg). Compared case-insensitively, since the
    /// output folder may be on a case-insensitive file system.
    /// </summary>
    internal static IReadOnlyDictionary<string, string> OutputStems(IReadOnlyList<string> inputs)
    {
        var stems = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var g in inputs.GroupBy(f => Path.GetFileNameWithoutExtension(f), StringComparer.OrdinalIgnoreCase))
        {
            var members = g.ToList();
            foreach (var f in members)
                stems[f] = members.Count == 1 ? Path.GetFileNameWithoutExtension(f)
                    : Path.GetFileNameWithoutExtension(f) + "_" + Path.GetExtension(f).TrimStart('.').ToLowerInvariant();
        }
        var clash = stems.GroupBy(kv => kv.Value, StringComparer.OrdinalIgnoreCase).FirstOrDefault(g => g.Count() > 1);
        if (clash != null)
            throw new ArgumentException($"-i: {string.Join(" and ", clash.Select(kv => Path.GetFileName(kv.Key)))} would both be written as {clash.Key}.png; rename one");
        return stems;
    }

    /// <summary>The output folder may not be a file, nor the folder the inputs are read from (outputs would replace them).</summary>
    static void CheckOutputFolder(RestoreSettings s)
    {
        if (File.Exists(s.Output)) throw new ArgumentException($"-o {s.Output}: is a file; give a folder for the outputs");
        static string Full(string p) => Path.TrimEndingDirectorySeparator(Path.GetFullPath(p));
        var inputDir = Directory.Exists(s.Input) ? Full(s.Input) : Full(Path.GetDirectoryName(Path.GetFullPath(s.Input))!);
        if (string.Equals(inputDir, Full(s.Output), StringComparison.Ordinal))
            throw new ArgumentException($"-o {s.Output}: is the folder the inputs are read from; restored images would replace or mix with them — choose another folder");
    }

    static string ChoosePreset(RestoreSettings s) => s.Preset ?? Presets.ChooseInstalled(s.Weights, s.Task);

    /// <summary>The guidance of the settings, or null (official default: none). A schedule multiplies --g-scale.</summary>
    internal static RestorationGuidance? MakeGuidance(RestoreSettings s)
    {
        if (s.Guidance == "none") return null;
        GuidanceSchedule? schedule;
        try { schedule = GuidanceSchedule.Parse(s.GSchedule); }
        catch (FormatException e) { throw new OptionException("--g-schedule", e.Message); }
        return RestorationGuidance.Create(s.Guidance, s.GScale, s.GStart, s.GStop, s.GSpace, s.GRepeat, schedule, s.GPatch, s.GNorm);
    }

    /// <summary>The preset's defaults with the options that were given on the command line (and nothing else) applied.</summary>
    static PipelineOptions MakeOptions(RestoreSettings s, PipelineOptions d, RestorationGuidance? guidance, long seed) => d with
    {
        Steps = s.Steps ?? d.Steps, Strength = s.Strength ?? d.Strength, Sampler = s.Sampler ?? d.Sampler, CfgScale = s.Cfg ?? d.CfgScale,
        RescaleCfg = s.RescaleCfg || d.RescaleCfg, PosPrompt = s.PosPrompt ?? d.PosPrompt, NegPrompt = s.NegPrompt ?? d.NegPrompt,
        NoiseAug = s.NoiseAug ?? d.NoiseAug,
        StartPointType = s.StartPoint is { } sp ? PipelineOptions.ParseStartPoint(sp) : d.StartPointType,
        SChurn = s.SChurn ?? d.SChurn, STmin = s.STmin ?? d.STmin, STmax = s.STmax ?? d.STmax, SNoise = s.SNoise ?? d.SNoise,
        Eta = s.Eta ?? d.Eta, Order = s.Order ?? d.Order,
        CleanerTiled = s.CleanerTiled || d.CleanerTiled, CleanerTileSize = s.CleanerTileSize ?? d.CleanerTileSize,
        CleanerTileStride = s.CleanerTileStride ?? d.CleanerTileStride,
        VaeEncoderTiled = s.VaeEncoderTiled || d.VaeEncoderTiled, VaeEncoderTileSize = s.VaeEncoderTileSize ?? d.VaeEncoderTileSize,
        VaeDecoderTiled = s.VaeDecoderTiled || d.VaeDecoderTiled, VaeDecoderTileSize = s.VaeDecoderTileSize ?? d.VaeDecoderTileSize,
        VaeTiling = s.VaeTiling is { } vt ? (vt == "gaussian_blend" ? Pipeline.VaeTiling.GaussianBlend : Pipeline.VaeTiling.SharedGroupNorm) : d.VaeTiling,
        VaeTileStride = s.VaeTileStride ?? d.VaeTileStride, PadMultiple = s.PadMultiple ?? d.PadMultiple,
        CldmTiled = s.CldmTiled || d.CldmTiled, CldmTileSize = s.CldmTileSize ?? d.CldmTileSize, CldmTileStride = s.CldmTileStride ?? d.CldmTileStride,
        Seed = seed, Guidance = guidance ?? d.Guidance,
    };

    int Run(RestoreSettings s, CancellationToken ct)
    {
        var sw = System.Diagnostics.Stopwatch.StartNew();
        // Everything that can be refused is refused before a network is built or a file written.
        var inputs = Inputs(s.Input);
        CheckOutputFolder(s);
        var presetName = ChoosePreset(s);
        var spec = Presets.Get(presetName);
        var task = Presets.ParseTask(s.Task);
        double upscale = s.Upscale ?? (task == RestorationTask.Sr ? 4 : 1);
        var guidance = MakeGuidance(s);
        var checkedOptions = MakeOptions(s, spec.Defaults, guidance, s.Seed);   // the manifest records these, the effective options
        PipelineChecks.Validate(checkedOptions);
        if (inputs.Count == 0) { CliErrors.Print($"-i {s.Input}: no images (PNG, JPEG, BMP, TIFF, WebP) in this folder"); return 2; }
        var stems = OutputStems(inputs);
        var device = s.Device == "cuda" ? torch.CUDA : torch.CPU;
        if (s.Device == "cuda" && !torch.cuda.is_available())
            throw new ArgumentException("--device cuda: CUDA is not available to TorchSharp here (see README, 'Using a GPU')");

        int failed = 0, done = 0, skipped = 0;
        var ready = new List<string>();
        foreach (var file in inputs)
        {
            try
            {
                CheckRegularFile(file);
                var header = ImageIO.Identify(file);
                Presets.CheckSizes(spec, task, upscale, header.Height, header.Width, file, checkedOptions);
                ready.Add(file);
            }
            catch (Exception e) when (e is ImageFileException or SizeLimitException or IOException or UnauthorizedAccessException)
            {
                failed++;
                CliErrors.Print(e.Message);
            }
        }
        if (ready.Count == 0) return 2;

        int threads = s.Threads ?? Environment.ProcessorCount;
        torch.set_num_threads(threads);
        var build = new BuildOptions
        {
            Upscale = upscale,
            Precision = Presets.ParsePrecision(s.Precision),
            Device = device,
            Custom = presetName == "custom"
                ? new CustomCheckpoints(s.SdCkpt ?? throw new ArgumentException("--sd-ckpt: required with --version custom"),
                                        s.CleanerCkpt ?? throw new ArgumentException("--cleaner-ckpt: required with --version custom"),
                                        s.ControlNetCkpt ?? throw new ArgumentException("--controlnet-ckpt: required with --version custom"))
                : null,
        };
        AnsiConsole.MarkupLine($"preset [bold]{presetName}[/], task {s.Task}, ×{upscale}, sampler {Markup.Escape(checkedOptions.Sampler)} {checkedOptions.Steps} steps, cfg {checkedOptions.CfgScale}, guidance {s.Guidance}, {s.Precision} on {s.Device}, {threads} threads");
        if (presetName == "tiny-random") AnsiConsole.MarkupLine("[yellow]tiny-random preset: random fixture-sized networks, NOT a trained model — outputs only exercise the pipeline[/]");
        if (presetName == "tiny") AnsiConsole.MarkupLine("[yellow]tiny preset: a tiny DiffBIR trained on procedural images (weights/tiny) — for experiments, not for photos[/]");

        Directory.CreateDirectory(s.Output);
        using var preset = Presets.Build(presetName, s.Task, s.Weights, build);
        var checkpoints = CheckpointHashes(preset, s, presetName);
        var settings = SettingsJson(s, checkedOptions, presetName, upscale, threads);
        bool stop = false;

        // The work: one item per (image, sample); up-to-date outputs are skipped before anything runs.
        var work = new List<WorkItem>();
        foreach (var file in ready)
        {
            string inputSha;
            try { inputSha = Sha256(file); }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { failed++; CliErrors.Print($"{file}: {e.Message}"); continue; }
            for (int k = 0; k < s.NSamples; k++)
            {
                var stem = stems[file] + (s.NSamples > 1 ? $"_{k}" : "");
                var item = new WorkItem(file, stem, Path.Combine(s.Output, stem + ".png"), Path.Combine(s.Output, stem + ".json"),
                    inputSha, s.Seed + k, SkipKey(settings, inputSha, s.Seed + k, checkpoints));
                if (!s.Force && UpToDate(item.OutPng, item.OutJson, item.Key)) { skipped++; AnsiConsole.MarkupLine($"[grey]{Markup.Escape(stem)}: up to date, skipped[/]"); }
                else work.Add(item);
            }
        }

        AnsiConsole.Progress().AutoClear(false).HideCompleted(false)
            .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn(), new RemainingTimeColumn())
            .Start(pctx =>
            {
                var all = pctx.AddTask("all images", maxValue: Math.Max(1, work.Count));
                LoadedImage? cached = null; string? cachedFile = null;
                LoadedImage Load(string file)
                {
                    if (cachedFile == file && cached != null) return cached;
                    cached?.Dispose(); cached = null; cachedFile = null;
                    cached = ImageIO.Load(file); cachedFile = file;
                    return cached;
                }
                try
                {
                    int i = 0;
                    while (i < work.Count && !stop)
                    {
                        if (ct.IsCancellationRequested) return;
                        // A batch: consecutive items whose images have one size (samples of one image, or a folder of equal
                        // sizes), up to --batch-size; each keeps its own seed (BatchNoise), so it equals its lone run.
                        var batch = new List<(WorkItem Item, Tensor Lq, ImageInfo Info)>();
                        while (i < work.Count && batch.Count < s.BatchSize)
                        {
                            var item = work[i];
                            Tensor lq; ImageInfo info;
                            try
                            {
                                var loaded = Load(item.File);
                                info = loaded.Info;
                                // The official code feeds uint8 HWC; 8-bit sources round-trip exactly, 16-bit ones are rounded to 8 bits.
                                lq = ImageIO.ToUInt8(loaded.Image, Quantization.Round);
                            }
                            catch (Exception e) when (e is ImageFileException or IOException or ArgumentException)
                            {
                                failed++; i++; all.Increment(1);
                                CliErrors.Print(e.Message.StartsWith(item.File, StringComparison.Ordinal) ? e.Message : $"{item.File}: {e.Message}");
                                continue;
                            }
                            if (batch.Count > 0 && !lq.shape.SequenceEqual(batch[0].Lq.shape)) { lq.Dispose(); break; }
                            if (batch.Count == 0 || !ReferenceEquals(batch[^1].Info, info))
                                foreach (var n in info.Notices) AnsiConsole.MarkupLine($"[grey]{Markup.Escape(Path.GetFileName(item.File))}: {Markup.Escape(n)}[/]");
                            batch.Add((item, lq, info));
                            i++;
                        }
                        if (batch.Count == 0) continue;
                        var names = batch.Count == 1 ? batch[0].Item.Stem : $"{batch[0].Item.Stem} (+{batch.Count - 1})";
                        var task = pctx.AddTask(Markup.Escape(names), maxValue: checkedOptions.Steps);
                        var t0 = System.Diagnostics.Stopwatch.StartNew();
                        try
                        {
                            using var scope = torch.NewDisposeScope();
                            var lqBatch = batch.Count == 1 ? batch[0].Lq : torch.cat(batch.Select(b => b.Lq).ToArray(), 0);
                            using var noise = batch.Count == 1 ? null : new BatchNoise(batch.Select(b => b.Item.Seed).ToArray());
                            var guided = new JsonArray();
                            bool OnStep(DiffBIR.Lab.Sampling.StepInfo info)
                            {
                                task.Increment(1);
                                // what the guide did: the scale it used, s·f(t), and its loss
                                if (info.GuidanceApplied)
                                    guided.Add(new JsonObject { ["step"] = info.Step, ["t"] = info.Timestep, ["scale"] = info.GuidanceScale, ["loss"] = info.GuidanceLoss });
                                return true;
                            }
                            var options = MakeOptions(s, spec.Defaults, guidance, batch[0].Item.Seed) with { Noise = noise };
                            using var result = preset.Restore(lqBatch, options, stepObserver: OnStep, cancellation: ct);
                            double seconds = Math.Round(t0.Elapsed.TotalSeconds / batch.Count, 3);
                            for (int n = 0; n < batch.Count; n++)
                            {
                                var (item, _, info) = batch[n];
                                ImageIO.Save(item.OutPng, result.Image.narrow(0, n, 1));
                                var manifest = new JsonObject
                                {
                                    ["output"] = Path.GetFileName(item.OutPng),
                                    ["output_sha256"] = Sha256(item.OutPng),
                                    ["input"] = Path.GetFullPath(item.File),
                                    ["input_sha256"] = item.InputSha,
                                    ["input_info"] = $"{info.Format} {info.Width}×{info.Height} {info.BitDepth}-bit",
                                    ["notices"] = new JsonArray(info.Notices.Concat(result.Notes).Select(x => (JsonNode)x!).ToArray()),
                                    ["seed"] = item.Seed,
                                    ["batch"] = batch.Count,
                                    // what guidance did: per guided step the scale in effect, s·f(t), and the loss (whole batch)
                                    ["guidance_steps"] = JsonNode.Parse(guided.ToJsonString()),
                                    ["settings"] = JsonNode.Parse(settings.ToJsonString()),
                                    ["checkpoints"] = JsonNode.Parse(JsonSerializer.Serialize(checkpoints)),
                                    ["not_a_trained_model"] = result.NotATrainedModel,
                                    ["output_size"] = $"{result.Image.shape[2]}×{result.Image.shape[1]}",
                                    ["versions"] = new JsonObject
                                    {
                                        ["diffbir_lab"] = typeof(RestorationPipeline).Assembly.GetName().Version?.ToString(),
                                        ["torchsharp"] = typeof(torch).Assembly.GetName().Version?.ToString(),
                                        ["libtorch"] = LibTorchVersion,
                                        ["libtorch_path"] = DiffBIR.Lab.RunInfo.LibTorchPath,
                                        ["dotnet"] = Environment.Version.ToString(),
                                    },
                                    ["device"] = s.Device, ["precision"] = s.Precision, ["threads"] = threads,
                                    ["elapsed_seconds"] = seconds,
                                    ["date"] = DateTime.UtcNow.ToString("o", CultureInfo.InvariantCulture),
                                    ["skip_key"] = item.Key,
                                };
                                AtomicFile.WriteAllText(item.OutJson, manifest.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
                                done++;
                            }
                            task.Value = task.MaxValue;
                            task.Description = Markup.Escape(names) + $" [green]{t0.Elapsed.TotalSeconds:F1}s[/]";
                        }
                        catch (OperationCanceledException) { task.Description = Markup.Escape(names) + " [yellow](cancelled)[/]"; return; }
                        catch (NonFiniteException e)
                        {
                            failed += batch.Count; stop = true;
                            task.StopTask();
                            CliErrors.Print($"{string.Join(", ", batch.Select(b => b.Item.File).Distinct())}: {e.Message}; stopping");
                        }
                        catch (Exception e) when (e is ImageFileException or IOException or ArgumentException or InvalidOperationException or CheckpointException)
                        {
                            failed += batch.Count;
                            task.StopTask();
                            task.Description = Markup.Escape(names) + " [red](failed)[/]";
                            var files = string.Join(", ", batch.Select(b => b.Item.File).Distinct());
                            var msg = e.Message.StartsWith(batch[0].Item.File, StringComparison.Ordinal) ? e.Message : $"{files}: {e.Message}";
                            CliErrors.Print(msg + OomHint(e));
                        }
                        finally
                        {
                            foreach (var b in batch) b.Lq.Dispose();
                            all.Increment(batch.Count);
                        }
                    }
                }
                finally { cached?.Dispose(); }
            });
        AnsiConsole.MarkupLine($"{done} restored, {skipped} up to date, {failed} failed in {sw.Elapsed.TotalSeconds:F1}s → {Markup.Escape(Path.GetFullPath(s.Output))}");
        if (ct.IsCancellationRequested) return 130;
        if (failed == 0) return 0;
        return done + skipped > 0 ? 1 : 2;
    }

    /// <summary>One output to make: an input file, its sample's stem, seed and skip key.</summary>
    sealed record WorkItem(string File, string Stem, string OutPng, string OutJson, string InputSha, long Seed, string Key);

    /// <summary>The libtorch the process loaded (TorchSharp's native build string), or "unknown".</summary>
    internal static string LibTorchVersion => DiffBIR.Lab.RunInfo.LibTorchVersion;

    /// <summary>An output counts as up to date only when its manifest has the same key and the image's bytes are the ones recorded.</summary>
    static bool UpToDate(string outPng, string outJson, string key)
    {
        if (!File.Exists(outPng) || !File.Exists(outJson)) return false;
        try
        {
            var m = JsonNode.Parse(File.ReadAllText(outJson));
            return (string?)m?["skip_key"] == key && (string?)m?["output_sha256"] == Sha256(outPng);
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException) { return false; }
    }

    static string OomHint(Exception e) =>
        e.Message.Contains("out of memory", StringComparison.OrdinalIgnoreCase) || e.Message.Contains("alloc", StringComparison.OrdinalIgnoreCase)
            ? " — out of memory: try --cldm-tiled --vae-encoder-tiled --vae-decoder-tiled (and --cleaner-tiled), or --precision fp16"
            : "";

    static string Sha256(string path)
    {
        using var fs = File.OpenRead(path);
        return Convert.ToHexStringLower(SHA256.HashData(fs));
    }

    /// <summary>SHA-256 of every checkpoint the preset loaded (tiny: none — random weights, named as such).</summary>
    static SortedDictionary<string, string> CheckpointHashes(PresetPipeline preset, RestoreSettings s, string presetName)
    {
        var result = new SortedDictionary<string, string>(StringComparer.Ordinal);
        foreach (var path in preset.CheckpointPaths)
            result[Path.GetFileName(path)] = Sha256(path);
        if (result.Count == 0) result["(none)"] = presetName == "tiny-random" ? "random weights (tiny-random preset, seeded)" : "none";
        return result;
    }

    /// <summary>The effective pipeline options (the preset's defaults with the given overrides; the seed is per output)
    /// and the run's own settings.</summary>
    static JsonObject SettingsJson(RestoreSettings s, PipelineOptions effective, string preset, double upscale, int threads)
    {
        var o = new JsonObject { ["preset"] = preset, ["task"] = s.Task, ["upscale"] = upscale };
        foreach (var (k, v) in effective.ToJson())
            if (k is not ("seed" or "noise")) o[k] = v?.DeepClone();
        o["precision"] = s.Precision; o["device"] = s.Device; o["threads"] = threads; o["batch_size"] = s.BatchSize;
        return o;
    }

    /// <summary>What makes an output reusable: settings, input bytes, seed and checkpoint bytes.</summary>
    static string SkipKey(JsonObject settings, string inputSha, long seed, SortedDictionary<string, string> checkpoints)
    {
        var text = settings.ToJsonString() + "|" + inputSha + "|" + seed + "|" + string.Join(",", checkpoints.Select(kv => kv.Key + "=" + kv.Value));
        return Convert.ToHexStringLower(SHA256.HashData(System.Text.Encoding.UTF8.GetBytes(text)));
    }
}
