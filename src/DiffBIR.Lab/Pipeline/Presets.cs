using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Diffusion;
using DiffBIR.Lab.Models;
using DiffBIR.Lab.Models.Clip;
using DiffBIR.Lab.Models.Stage1;
using DiffBIR.Lab.Weights;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Pipeline;

/// <summary>The official <c>--task</c>: super-resolution (BSR), aligned faces (BFR), denoising (BID).</summary>
public enum RestorationTask { Sr, Face, Denoise }

/// <summary>The stage-1 network and its checkpoint (a weights-manifest id) for one task.</summary>
public sealed record CleanerChoice(CleanerKind Kind, string CheckpointId);

/// <summary>
/// A model version of DiffBIR (official <c>--version</c>) and everything it fixes: the checkpoints (ids of
/// weights/manifest.json), the noise schedule and parameterisation, the cleaner per task, whether the loop
/// bicubic-upscales the input before the cleaner, and the sampler defaults of inference.py (the same for every
/// version at HEAD: edm_dpm++_3m_sde, 10 steps, CFG 6, start point noise).
/// </summary>
public sealed record PresetSpec(
    string Name,
    NoiseSchedule Schedule,
    string? SdCheckpointId,
    IReadOnlyDictionary<RestorationTask, string> ControlNetIds,
    IReadOnlyDictionary<RestorationTask, CleanerChoice> Cleaners,
    PipelineOptions Defaults,
    bool NotATrainedModel = false)
{
    public Parameterization Parameterization => Schedule.Parameterization;

    /// <summary>Whether the official loop upscales the lq with Pillow bicubic before the cleaner (every case except
    /// v2 super-resolution, where BSRNet upscales itself).</summary>
    public bool PreUpscale(RestorationTask task) => Cleaners[task].Kind != CleanerKind.BSRNet;
}

/// <summary>Checkpoints of a self-trained model (official <c>--version custom</c>: train config's sd_path and
/// swinir_path, <c>--ckpt</c> for the IRControlNet), with the training schedule.</summary>
public sealed record CustomCheckpoints(string SdPath, string CleanerPath, string ControlNetPath, NoiseSchedule? Schedule = null,
    SwinIRConfig? CleanerConfig = null, ControlLdmConfig? CldmConfig = null);

/// <summary>Precision of the diffusion networks (official <c>--precision</c>).</summary>
public enum Precision { Fp32, Fp16, Bf16 }

/// <summary>Options of <see cref="Presets.Build"/>.</summary>
public sealed record BuildOptions
{
    /// <summary>Official default fp16 (on CUDA). Here: UNet and ControlNet cast as the official <c>cast_dtype</c>
    /// (GroupNorm kept float32); the VAE, CLIP and the cleaner stay float32 because TorchSharp has no autocast.</summary>
    public Precision Precision { get; init; } = Precision.Fp32;
    /// <summary>Final upscale (official <c>--upscale</c>, default 4).</summary>
    public double Upscale { get; init; } = 4;
    /// <summary>Seed of the tiny-random preset's random weights.</summary>
    public long TinySeed { get; init; } = 1234;
    /// <summary>Folder of the trained tiny weights (null: weights/tiny of the repository the library runs from, see
    /// <see cref="Presets.FindTinyWeights"/>).</summary>
    public string? TinyWeightsDir { get; init; }
    /// <summary>Preset tiny: an IRControlNet variant to load instead of the committed controlnet.safetensors (Table 1
    /// in miniature: <c>weights train-tiny --variants</c>); the file is trusted as given (no SHA-256 in recipe.json).</summary>
    public (Models.StableDiffusion.ControlMode Mode, string File)? TinyControlNet { get; init; }
    public CustomCheckpoints? Custom { get; init; }
    public Device? Device { get; init; }
}

/// <summary>Raised when a preset's checkpoint files are not in the weights folder.</summary>
public sealed class MissingWeightsException : FileNotFoundException
{
    public IReadOnlyList<string> MissingFiles { get; }
    public string FetchCommand { get; }

    /// <param name="fetchPreset">The preset whose fetch brings the files (default: <paramref name="preset"/>; the tiny
    /// and custom presets need only the BPE vocabulary, which every official preset fetches).</param>
    public MissingWeightsException(string folder, string preset, IReadOnlyList<string> files, string? fetchPreset = null)
        : base($"preset '{preset}' needs {files.Count} file(s) missing from {folder}: {string.Join(", ", files)}. " +
               $"Download them with: diffbir-lab weights fetch {fetchPreset ?? preset}")
    {
        MissingFiles = files; FetchCommand = $"diffbir-lab weights fetch {fetchPreset ?? preset}";
    }
}

/// <summary>A built pipeline with the preset it came from, ready to <see cref="RestorationPipeline.Run"/>.</summary>
public sealed class PresetPipeline : IDisposable
{
    public PresetSpec Preset { get; }
    public RestorationTask Task { get; }
    public RestorationPipeline Pipeline { get; }
    public double Upscale { get; }

    /// <summary>The checkpoint files this pipeline was loaded from (empty for the tiny preset's random weights).</summary>
    public IReadOnlyList<string> CheckpointPaths { get; init; } = Array.Empty<string>();

    internal PresetPipeline(PresetSpec preset, RestorationTask task, RestorationPipeline pipeline, double upscale)
    {
        Preset = preset; Task = task; Pipeline = pipeline; Upscale = upscale;
    }

    /// <summary>The whole official inference loop for one uint8 [N, H, W, 3] input: the loop's pre-upscale where the
    /// preset has one, then <see cref="RestorationPipeline.Run"/> with the preset's defaults (overridden by
    /// <paramref name="options"/>).</summary>
    public RestorationResult Restore(Tensor lqUint8Nhwc, PipelineOptions? options = null, Action<PipelineEvent>? observer = null,
        Func<Sampling.StepInfo, bool>? stepObserver = null, CancellationToken cancellation = default)
    {
        var o = options ?? Preset.Defaults;
        PipelineChecks.Validate(o);
        Presets.CheckSizes(Preset, Task, Upscale, lqUint8Nhwc.shape[1], lqUint8Nhwc.shape[2], "input", o);
        if (!Preset.PreUpscale(Task)) return Pipeline.Run(lqUint8Nhwc, o, observer, stepObserver, cancellation);
        using var up = PilResize.Upscale(lqUint8Nhwc, Upscale);
        return Pipeline.Run(up, o, observer, stepObserver, cancellation);
    }

    /// <summary>The conditioning half of <see cref="Restore"/> (the loop's pre-upscale, then
    /// <see cref="RestorationPipeline.Condition"/>): compute it once per input, then <see cref="Sample"/> any number
    /// of sampling settings on it.</summary>
    public ConditionedInput Condition(Tensor lqUint8Nhwc, PipelineOptions? options = null, Action<PipelineEvent>? observer = null)
    {
        var o = options ?? Preset.Defaults;
        PipelineChecks.Validate(o);
        Presets.CheckSizes(Preset, Task, Upscale, lqUint8Nhwc.shape[1], lqUint8Nhwc.shape[2], "input", o);
        if (!Preset.PreUpscale(Task)) return Pipeline.Condition(lqUint8Nhwc, o, observer);
        using var up = PilResize.Upscale(lqUint8Nhwc, Upscale);
        return Pipeline.Condition(up, o, observer);
    }

    /// <summary>The sampling half of <see cref="Restore"/> on a condition from <see cref="Condition"/> (options default
    /// to the preset's).</summary>
    public RestorationResult Sample(ConditionedInput condition, PipelineOptions? options = null, Action<PipelineEvent>? observer = null,
        Func<Sampling.StepInfo, bool>? stepObserver = null, CancellationToken cancellation = default) =>
        Pipeline.Sample(condition, options ?? Preset.Defaults, observer, stepObserver, cancellation);

    public void Dispose() => Pipeline.Dispose();
}

/// <summary>
/// The presets <c>v1</c>, <c>v2</c>, <c>v2.1</c>, <c>custom</c> (official inference.py versions) and <c>tiny</c>
/// (the fixtures' tiny networks with seeded random weights: restores on CPU in seconds, output marked as not from a
/// trained model), and the factory that builds a pipeline from real checkpoints.
/// </summary>
public static class Presets
{
    static IReadOnlyDictionary<RestorationTask, T> PerTask<T>(T sr, T face, T denoise) =>
        new Dictionary<RestorationTask, T> { [RestorationTask.Sr] = sr, [RestorationTask.Face] = face, [RestorationTask.Denoise] = denoise };

    static readonly PipelineOptions InferenceDefaults = new();

    public static PresetSpec V1 { get; } = new("v1", NoiseSchedule.V2, "sd_v2.1",
        PerTask("v1_general", "v1_face", "v1_general"),
        PerTask(new CleanerChoice(CleanerKind.SwinIR, "swinir_general"), new CleanerChoice(CleanerKind.SwinIR, "swinir_face"), new CleanerChoice(CleanerKind.SwinIR, "swinir_general")),
        InferenceDefaults);

    public static PresetSpec V2 { get; } = new("v2", NoiseSchedule.V2, "sd_v2.1",
        PerTask("v2", "v2", "v2"),
        PerTask(new CleanerChoice(CleanerKind.BSRNet, "bsrnet"), new CleanerChoice(CleanerKind.SwinIR, "swinir_face"), new CleanerChoice(CleanerKind.SCUNet, "scunet_psnr")),
        InferenceDefaults);

    public static PresetSpec V2_1 { get; } = new("v2.1", NoiseSchedule.V2_1, "sd_v2.1_zsnr",
        PerTask("v2.1", "v2.1", "v2.1"),
        PerTask(new CleanerChoice(CleanerKind.SwinIR, "swinir_realesrgan"), new CleanerChoice(CleanerKind.SwinIR, "swinir_face"), new CleanerChoice(CleanerKind.SwinIR, "swinir_realesrgan")),
        InferenceDefaults);

    /// <summary>Self-trained checkpoints (paths in <see cref="BuildOptions.Custom"/>); SwinIR cleaner as the official custom loop.</summary>
    public static PresetSpec Custom { get; } = new("custom", NoiseSchedule.V2, null,
        PerTask("custom", "custom", "custom"),
        PerTask(new CleanerChoice(CleanerKind.SwinIR, "custom"), new CleanerChoice(CleanerKind.SwinIR, "custom"), new CleanerChoice(CleanerKind.SwinIR, "custom")),
        InferenceDefaults);

    /// <summary>
    /// The trained tiny DiffBIR (weights/tiny, made by <c>diffbir-lab weights train-tiny</c>, docs/tiny-preset.md):
    /// VAE, UNet prior, SwinIR stage 1 and IRControlNet trained on procedural images with the v2.1 schedule (zero
    /// terminal SNR, v-prediction, as the official HEAD: the EDM samplers need it), a 128-px condition; one stage-1
    /// network for every task. The schedule actually used is the one recipe.json names (older weights: v2). It has no
    /// text conditioning (trained with the empty prompt), so both prompts default to "" and CFG to 1.
    /// </summary>
    public static PresetSpec Tiny { get; } = new("tiny", NoiseSchedule.V2_1, "tiny/unet+vae",
        PerTask("tiny/controlnet", "tiny/controlnet", "tiny/controlnet"),
        PerTask(new CleanerChoice(CleanerKind.SwinIR, "tiny/stage1"), new CleanerChoice(CleanerKind.SwinIR, "tiny/stage1"), new CleanerChoice(CleanerKind.SwinIR, "tiny/stage1")),
        InferenceDefaults with { PosPrompt = "", NegPrompt = "", CfgScale = 1.0, Sampler = "ddim" });

    /// <summary>Fixture-sized networks with seeded random weights; 2 steps and a 128-px condition (official 512) so a
    /// restore takes seconds on a CPU. Its images are noise: results carry NotATrainedModel. For tests.</summary>
    public static PresetSpec TinyRandom { get; } = new("tiny-random", NoiseSchedule.V2, null,
        PerTask("random", "random", "random"),
        PerTask(new CleanerChoice(CleanerKind.BSRNet, "random"), new CleanerChoice(CleanerKind.SwinIR, "random"), new CleanerChoice(CleanerKind.SCUNet, "random")),
        InferenceDefaults with { Steps = 2 }, NotATrainedModel: true);

    public static IReadOnlyList<PresetSpec> All { get; } = new[] { V1, V2, V2_1, Custom, Tiny, TinyRandom };

    /// <summary>Whether a preset is one of the two tiny ones (128-px condition, no official files).</summary>
    public static bool IsTiny(string presetName) => presetName is "tiny" or "tiny-random";

    /// <summary>
    /// The preset a run uses when none is named: the newest official one whose files are all in
    /// <paramref name="weightsDir"/> for <paramref name="task"/> (v2.1, then v2, then v1), else the trained tiny one.
    /// </summary>
    public static string ChooseInstalled(string weightsDir, string task)
    {
        var manifest = Path.Combine(weightsDir, "manifest.json");
        if (File.Exists(manifest))
        {
            var m = WeightsManifest.Load(manifest);
            foreach (var p in new[] { "v2.1", "v2", "v1" })
                if (m.Missing(weightsDir, p, task).Count == 0) return p;
        }
        return "tiny";
    }

    /// <summary>The official <c>--precision</c> names: fp32, fp16, bf16 (anything else is refused naming the option).</summary>
    public static Precision ParsePrecision(string name) => name switch
    {
        "fp32" => Precision.Fp32, "fp16" => Precision.Fp16, "bf16" => Precision.Bf16,
        _ => throw new OptionException("--precision", $"must be fp32, fp16 or bf16 (got '{name}')"),
    };

    public static PresetSpec Get(string name) => All.FirstOrDefault(p => p.Name == name)
        ?? throw new ArgumentException($"unknown preset '{name}' (known: {string.Join(", ", All.Select(p => p.Name))})");

    /// <summary>
    /// The sizes a preset makes for an h × w input with this upscale (the loop's pre-upscale, the cleaner's output,
    /// the condition short edge), checked against the limit before anything is built or allocated.
    /// </summary>
    public static SizePlan CheckSizes(PresetSpec preset, RestorationTask task, double upscale, long h, long w, string what,
        PipelineOptions? options = null, double maxMegapixels = PipelineChecks.DefaultMaxMegapixels)
    {
        if (!double.IsFinite(upscale) || upscale <= 0) throw new OptionException("--upscale", $"must be a finite number above 0 (got {upscale})");
        int shortEdge = IsTiny(preset.Name) ? TinyConditionShortEdge : 512;
        // Both branches give the final size h·s × w·s: the loop's Pillow pre-upscale, or BSRNet's set_output_size.
        var plan = PipelineChecks.Plan(Math.Floor(h * upscale), Math.Floor(w * upscale), shortEdge);
        return PipelineChecks.CheckSizes(plan, h, w, what, options, maxMegapixels);
    }

    public static RestorationTask ParseTask(string task) => task switch
    {
        "sr" => RestorationTask.Sr,
        "face" => RestorationTask.Face,
        "denoise" => RestorationTask.Denoise,
        _ => throw new ArgumentException($"unknown task '{task}' (known: sr, face, denoise)"),
    };

    static string TaskName(RestorationTask t) => t switch { RestorationTask.Sr => "sr", RestorationTask.Face => "face", _ => "denoise" };

    public const string BpeVocabFile = "bpe_simple_vocab_16e6.txt.gz";

    /// <summary>The fixtures' tiny ControlLDM (e2e_bsr_v2 config: UNet/ControlNet 32 channels, KL-f8 VAE with 32 channels, 3-layer CLIP).</summary>
    public const string TinyCldmJson = """
    {"unet_cfg": {"use_checkpoint": true, "image_size": 32, "in_channels": 4, "use_spatial_transformer": true, "use_linear_in_transformer": true, "transformer_depth": 1, "legacy": false, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1, 2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 8, "context_dim": 32},
     "controlnet_cfg": {"use_checkpoint": true, "image_size": 32, "in_channels": 4, "use_spatial_transformer": true, "use_linear_in_transformer": true, "transformer_depth": 1, "legacy": false, "model_channels": 32, "attention_resolutions": [1, 2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 8, "context_dim": 32, "hint_channels": 4},
     "vae_cfg": {"embed_dim": 4, "ddconfig": {"double_z": true, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}},
     "clip_cfg": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3}, "layer": "penultimate"},
     "latent_scale_factor": 0.18215}
    """;

    /// <summary>
    /// Builds the pipeline of a preset for a task. Real presets load from <paramref name="weightsDir"/> (file names of
    /// weights/manifest.json): the SD checkpoint with the official prefix rules (missing keys reported, unused
    /// ignored), the IRControlNet and the cleaner strictly. Missing files raise <see cref="MissingWeightsException"/>,
    /// which names each file and the fetch command. The tiny preset needs only the BPE vocabulary (a tokenizer table,
    /// fetched with every preset) in <paramref name="weightsDir"/>.
    /// </summary>
    public static PresetPipeline Build(string preset, string task, string weightsDir, BuildOptions? options = null) =>
        Build(Get(preset), ParseTask(task), weightsDir, options);

    public static PresetPipeline Build(PresetSpec preset, RestorationTask task, string weightsDir, BuildOptions? options = null)
    {
        var o = options ?? new BuildOptions();
        IReadOnlyList<string> tinyFiles = Array.Empty<string>();
        RestorationPipeline pipe = preset.Name switch
        {
            "tiny" => BuildTinyTrained(preset, o, out tinyFiles),
            "tiny-random" => BuildTiny(preset, task, weightsDir, o),
            "custom" => BuildCustom(preset, task, weightsDir, o),
            _ => BuildOfficial(preset, task, weightsDir, o),
        };
        if (o.Device is { } device && device.type != DeviceType.CPU)
        {
            pipe.Cleaner.Network.to(device);
            pipe.Cldm.to(device);
        }
        if (o.Precision != Precision.Fp32)
            pipe.Cldm.CastDtype(o.Precision == Precision.Fp16 ? ScalarType.Float16 : ScalarType.BFloat16);
        var vocab = Path.Combine(weightsDir, BpeVocabFile);
        IEnumerable<string> files = preset.Name switch
        {
            "tiny" => tinyFiles,
            "tiny-random" => new[] { vocab }.Where(File.Exists),
            "custom" => new[] { o.Custom!.SdPath, o.Custom.CleanerPath, o.Custom.ControlNetPath, vocab },
            _ => WeightsManifest.Load(FindManifest()).FilesFor(preset.Name, TaskName(task)).Select(f => Path.Combine(weightsDir, f.File)),
        };
        return new PresetPipeline(preset, task, pipe, o.Upscale) { CheckpointPaths = files.ToList() };
    }

    static ClipTokenizer Tokenizer(string weightsDir, string preset)
    {
        var path = Path.Combine(weightsDir, BpeVocabFile);
        if (!File.Exists(path))
            throw new MissingWeightsException(weightsDir, preset, new[] { BpeVocabFile }, IsTiny(preset) || preset == "custom" ? "v2" : preset);
        return new ClipTokenizer(path);
    }

    static RestorationPipeline BuildOfficial(PresetSpec preset, RestorationTask task, string weightsDir, BuildOptions o)
    {
        var manifest = WeightsManifest.Load(FindManifest());
        var missing = manifest.Missing(weightsDir, preset.Name, TaskName(task)).Select(f => f.File).ToList();
        if (missing.Count > 0) throw new MissingWeightsException(weightsDir, preset.Name, missing);
        string FileOf(string id) => Path.Combine(weightsDir, manifest[id].File);

        var cldm = new ControlLDM(ControlLdmConfig.Sd21, Tokenizer(weightsDir, preset.Name));
        using (var sd = Checkpoint.Load(FileOf(preset.SdCheckpointId!)))
            LoadSd(cldm, sd.Tensors, manifest[preset.SdCheckpointId!].File);
        using (var cn = Checkpoint.Load(FileOf(preset.ControlNetIds[task])))
            cldm.LoadControlNet(cn.Tensors, manifest[preset.ControlNetIds[task]].File);
        cldm.eval();
        var choice = preset.Cleaners[task];
        var cleaner = MakeCleaner(choice.Kind, o.Upscale, null);
        using (var w = Checkpoint.Load(FileOf(choice.CheckpointId)))
            StateDictLoader.Load(cleaner.Network, w.Tensors, strict: true, sourceName: manifest[choice.CheckpointId].File);
        return new RestorationPipeline(cleaner, cldm, preset.Schedule);
    }

    /// <summary>
    /// The official prefix rules (keys outside UNet, VAE and CLIP text are unused: EMA copies, CLIP's visual tower),
    /// but every key the model needs must be there: a file that is not a matching SD 2.1 checkpoint is refused with
    /// the missing keys named (the official loader only prints them, and a run would use random weights).
    /// </summary>
    static void LoadSd(ControlLDM cldm, IReadOnlyDictionary<string, Tensor> tensors, string source)
    {
        var (unused, missing) = cldm.LoadPretrainedSd(tensors, source);
        if (missing.Count == 0) return;
        static string First(IReadOnlyList<string> keys) => string.Join(", ", keys.Take(3)) + (keys.Count > 3 ? ", …" : "");
        throw new CheckpointException(source,
            $"not a Stable Diffusion 2.1 checkpoint for this model: {missing.Count} of its keys are missing ({First(missing)})" +
            (unused.Count > 0 ? $"; {unused.Count} keys of the file are unused ({First(unused)})" : ""));
    }

    static RestorationPipeline BuildCustom(PresetSpec preset, RestorationTask task, string weightsDir, BuildOptions o)
    {
        var c = o.Custom ?? throw new ArgumentException("preset 'custom' needs BuildOptions.Custom (SD, cleaner and ControlNet checkpoint paths)");
        var missing = new[] { c.SdPath, c.CleanerPath, c.ControlNetPath }.Where(p => !File.Exists(p)).ToList();
        if (missing.Count > 0)
            throw new FileNotFoundException($"preset 'custom': missing checkpoint file(s): {string.Join(", ", missing)}");
        // Read the SD file first: one with no SD keys at all is refused before 1.7 G parameters are built.
        using var sd = Checkpoint.Load(c.SdPath);
        var (components, unusedKeys) = SdCheckpointKeys.Split(sd.Tensors);
        if (components.Values.All(x => x.Count == 0))
            throw new CheckpointException(c.SdPath, $"not a Stable Diffusion checkpoint: none of its {sd.Count} keys starts with " +
                $"{string.Join(", ", SdCheckpointKeys.Prefixes.Select(p => p.SdPrefix))} (first keys: {string.Join(", ", unusedKeys.Take(3))})");
        // A ControlNet trained as Variant 5 or 6 says so in its metadata (Training.TrainingCheckpoint.ControlModeKey).
        var cldmConfig = (c.CldmConfig ?? ControlLdmConfig.Sd21) with { Mode = Training.TrainingCheckpoint.ControlModeOf(c.ControlNetPath) };
        var cldm = new ControlLDM(cldmConfig, Tokenizer(weightsDir, "custom"));
        LoadSd(cldm, sd.Tensors, c.SdPath);
        using (var cn = Checkpoint.Load(c.ControlNetPath)) cldm.LoadControlNet(cn.Tensors, c.ControlNetPath);
        cldm.eval();
        var cleaner = new SwinIRCleaner(new SwinIR(c.CleanerConfig ?? SwinIRConfig.Full));
        using (var w = Checkpoint.Load(c.CleanerPath)) StateDictLoader.Load(cleaner.Network, w.Tensors, strict: true, sourceName: c.CleanerPath);
        return new RestorationPipeline(cleaner, cldm, c.Schedule ?? preset.Schedule);
    }

    /// <summary>Short edge of the tiny presets' condition image (official: 512). Lowered so that a 32×32 input works at
    /// 128 px and takes seconds (the trained tiny model was trained on 64-px crops of 128-px images); everything
    /// else is the official flow.</summary>
    public const int TinyConditionShortEdge = 128;

    static Cleaner MakeCleaner(CleanerKind kind, double upscale, bool? tiny) => kind switch
    {
        CleanerKind.BSRNet => new BSRNetCleaner(new RRDBNet(tiny == true ? new RRDBNetConfig(Nf: 16, Nb: 2, Gc: 8) : RRDBNetConfig.Full), upscale)
            { ConditionShortEdge = tiny == true ? TinyConditionShortEdge : 512 },
        CleanerKind.SwinIR => new SwinIRCleaner(new SwinIR(tiny == true
            ? new SwinIRConfig(ImgSize: 64, EmbedDim: 16, Depths: new[] { 2, 2 }, NumHeads: new[] { 2, 2 }, WindowSize: 8, MlpRatio: 2, Sf: 8,
                Upsampler: "nearest+conv", Unshuffle: true, UnshuffleScale: 8)
            : SwinIRConfig.Full)) { ConditionShortEdge = tiny == true ? TinyConditionShortEdge : 512 },
        _ => new SCUNetCleaner(new SCUNet(tiny == true ? new SCUNetConfig(Blocks: new[] { 2, 2, 0, 0, 0, 2, 2 }, Dim: 64) : SCUNetConfig.Full))
            { ConditionShortEdge = tiny == true ? TinyConditionShortEdge : 512 },
    };

    /// <summary>
    /// weights/tiny with its recipe.json: <see cref="BuildOptions.TinyWeightsDir"/>, else the folder found by walking
    /// up from this library's assembly, then from the program's folder (so the repository's weights are found
    /// whatever the working directory: CLI, tests, notebooks referencing the built DLL).
    /// </summary>
    public static string FindTinyWeights(string? explicitDir = null)
    {
        if (explicitDir is not null)
            return File.Exists(Path.Combine(explicitDir, Training.TinyRecipe.RecipeFile)) ? explicitDir
                : throw new MissingWeightsException(explicitDir, "tiny", new[] { Training.TinyRecipe.RecipeFile }.Concat(Training.TinyRecipe.WeightFiles).ToList(), "tiny");
        var starts = new[] { Path.GetDirectoryName(typeof(Presets).Assembly.Location), AppContext.BaseDirectory }.Where(d => !string.IsNullOrEmpty(d));
        foreach (var start in starts)
            for (var d = new DirectoryInfo(start!); d is not null; d = d.Parent)
            {
                var p = Path.Combine(d.FullName, "weights", "tiny");
                if (File.Exists(Path.Combine(p, Training.TinyRecipe.RecipeFile))) return p;
            }
        throw new FileNotFoundException("preset 'tiny': weights/tiny/recipe.json not found above the program's folder; " +
            "regenerate the weights with scripts/train-tiny.sh (diffbir-lab weights train-tiny) or use --version tiny-random");
    }

    /// <summary>
    /// The trained tiny model: reads recipe.json (latent scale, SHA-256 of each file), checks every file's SHA-256
    /// (a mismatch names the file, both hashes and how to regenerate), loads VAE, UNet, IRControlNet and SwinIR
    /// strictly (float16 on disk → float32), and regenerates the frozen random CLIP from its seed.
    /// </summary>
    static RestorationPipeline BuildTinyTrained(PresetSpec preset, BuildOptions o, out IReadOnlyList<string> files)
    {
        var dir = FindTinyWeights(o.TinyWeightsDir);
        var recipePath = Path.Combine(dir, Training.TinyRecipe.RecipeFile);
        // A damaged recipe.json (bad JSON, a wrong type or value in the recorded architecture) is named as such, not
        // left to surface as an internal error from the config readers.
        T FromRecipe<T>(string part, Func<T> read) => Training.TinyRecipe.RecipePart(recipePath, part, read);
        var recipe = FromRecipe("not valid JSON", () => JsonNode.Parse(File.ReadAllText(recipePath))) ?? throw new CheckpointException(recipePath, "empty recipe");
        var missing = Training.TinyRecipe.WeightFiles.Where(f => !File.Exists(Path.Combine(dir, f))).ToList();
        if (missing.Count > 0) throw new MissingWeightsException(dir, "tiny", missing, "tiny (regenerate with scripts/train-tiny.sh)");
        foreach (var f in Training.TinyRecipe.WeightFiles)
        {
            var expected = (string?)recipe["sha256"]?[f] ?? throw new CheckpointException(recipePath, $"no SHA-256 for {f}");
            var actual = Training.TinyRecipe.Sha256(Path.Combine(dir, f));
            if (!string.Equals(expected, actual, StringComparison.OrdinalIgnoreCase))
                throw new CheckpointException(Path.Combine(dir, f), $"SHA-256 {actual} differs from {expected} in {Training.TinyRecipe.RecipeFile}; " +
                    "the file is damaged or from another run: restore it from git or regenerate all with scripts/train-tiny.sh");
        }
        double scale = FromRecipe("model.latent_scale_factor", () => (double?)recipe["model"]?["latent_scale_factor"]) ?? throw new CheckpointException(recipePath, "no model.latent_scale_factor");
        // The architecture recorded with the weights (recipes before it was read from there have the same one as the code).
        var cldm = FromRecipe("model.cldm", () => Training.TinyRecipe.NewCldm(scale, o.TinyControlNet?.Mode ?? Models.StableDiffusion.ControlMode.Add, recipe["model"]?["cldm"]));
        void Load(nn.Module m, string file)
        {
            using var sd = Checkpoint.Load(Path.Combine(dir, file));
            StateDictLoader.Load(m, sd.Tensors, strict: true, sourceName: Path.Combine(dir, file));
        }
        Load(cldm.vae, "vae.safetensors");
        Load(cldm.unet, "unet.safetensors");
        Load(cldm.controlnet, o.TinyControlNet?.File ?? "controlnet.safetensors");
        cldm.eval();
        // Recipes from before recipe.json recorded the stage-1 config and the schedule used SwinIR ×8 and v2.
        var stage1Config = recipe["model"]?["stage1_config"] is JsonNode sc ? FromRecipe("model.stage1_config", () => Models.Stage1.SwinIRConfig.FromJson(sc)) : Training.TinyRecipe.Stage1Config;
        var schedule = (string?)recipe["model"]?["schedule"] == "v2.1" ? Diffusion.NoiseSchedule.V2_1 : Diffusion.NoiseSchedule.V2;
        var cleaner = new SwinIRCleaner(new SwinIR(stage1Config)) { ConditionShortEdge = TinyConditionShortEdge };
        Load(cleaner.Network, "stage1.safetensors");
        cleaner.Network.eval();
        files = Training.TinyRecipe.WeightFiles.Select(f => Path.Combine(dir, f)).Append(recipePath).ToList();
        return new RestorationPipeline(cleaner, cldm, schedule);
    }

    static RestorationPipeline BuildTiny(PresetSpec preset, RestorationTask task, string weightsDir, BuildOptions o)
    {
        // Random weights: real BPE ids are not needed, so without the vocabulary the byte-level tokenizer stands in
        // (the tiny preset must run on a fresh machine with an empty weights/ folder).
        var vocab = Path.Combine(weightsDir, BpeVocabFile);
        var tokenizer = File.Exists(vocab) ? new ClipTokenizer(vocab) : ClipTokenizer.ByteLevel();
        var cldm = new ControlLDM(ControlLdmConfig.FromJson(JsonNode.Parse(TinyCldmJson)!), tokenizer);
        var cleaner = MakeCleaner(preset.Cleaners[task].Kind, o.Upscale, tiny: true);
        RandomInit(cldm, o.TinySeed);
        RandomInit(cleaner.Network, o.TinySeed + 1);
        cldm.eval();
        return new RestorationPipeline(cleaner, cldm, preset.Schedule) { NotATrainedModel = true };
    }

    /// <summary>
    /// Seeded random weights in the fixtures' spirit (every layer non-zero, so no output is trivially zero):
    /// weights of rank ≥ 2 N(0,1)/√fan_in, norm weights 1 + 0.1·N, other vectors 0.1·N. Walk order = named_parameters.
    /// </summary>
    public static void RandomInit(nn.Module module, long seed)
    {
        using var gen = new Generator((ulong)seed, torch.CPU);
        using var _ng = torch.no_grad();
        foreach (var (name, p) in module.named_parameters())
        {
            using var scope = torch.NewDisposeScope();
            var n = torch.randn(p.shape, ScalarType.Float32, torch.CPU, generator: gen);
            Tensor v;
            if (p.dim() >= 2) v = n / Math.Sqrt(p.shape.Skip(1).Aggregate(1L, (a, b) => a * b));
            else if (name.EndsWith("weight", StringComparison.Ordinal)) v = 1 + 0.1 * n;
            else v = 0.1 * n;
            p.copy_(v.to(p.dtype));
        }
    }

    /// <summary>weights/manifest.json of the repository (walks up from the working directory and the assembly).</summary>
    public static string FindManifest()
    {
        foreach (var start in new[] { Directory.GetCurrentDirectory(), AppContext.BaseDirectory })
            for (var d = new DirectoryInfo(start); d is not null; d = d.Parent)
            {
                var p = Path.Combine(d.FullName, "weights", "manifest.json");
                if (File.Exists(p)) return p;
            }
        throw new FileNotFoundException("weights/manifest.json not found above the working directory or the program");
    }
}
