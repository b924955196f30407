using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Diffusion;
using DiffBIR.Lab.Models;
using DiffBIR.Lab.Models.Clip;
using DiffBIR.Lab.Models.Stage1;
using DiffBIR.Lab.Models.StableDiffusion;
using DiffBIR.Lab.Pipeline;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Training;

/// <summary>Builds the <see cref="ITrainer"/> of a stage from <see cref="TrainOptions"/>.</summary>
public static class Trainers
{
    /// <summary>
    /// The tiny SwinIR of the tiny preset (Presets' cleaner for --version tiny): 16 channels, 2×2 blocks, window 8,
    /// pixel-unshuffle 8, as the official architecture otherwise.
    /// </summary>
    public static SwinIRConfig TinySwinIR { get; } = new(ImgSize: 64, EmbedDim: 16, Depths: new[] { 2, 2 }, NumHeads: new[] { 2, 2 },
        WindowSize: 8, MlpRatio: 2, Sf: 8, Upsampler: "nearest+conv", Unshuffle: true, UnshuffleScale: 8);

    /// <summary>The fixture-sized ControlLDM (Presets.TinyCldmJson) with the chosen control mode.</summary>
    public static ControlLdmConfig TinyCldm(ControlMode mode) =>
        ControlLdmConfig.FromJson(JsonNode.Parse(Presets.TinyCldmJson)!) with { Mode = mode };

    public static ControlMode ParseVariant(string variant) => variant switch
    {
        "irc" => ControlMode.Add,
        "v5" => ControlMode.ConcatFeatures,
        "v6" => ControlMode.Sft,
        _ => throw new ArgumentException($"--variant: must be irc, v5 or v6 (got '{variant}')"),
    };

    public static string VariantName(ControlMode mode) => mode switch
    {
        ControlMode.ConcatFeatures => "v5",
        ControlMode.Sft => "v6",
        _ => "irc",
    };

    /// <summary>Builds the networks (seeded), loads the starting checkpoints, moves to the device, makes the optimizer.</summary>
    public static ITrainer Create(TrainOptions o) => o.Stage switch
    {
        "stage1" => new Stage1Training(o),
        "stage2" => new Stage2Training(o),
        "prior" => new PriorTraining(o),
        _ => throw new ArgumentException($"unknown stage '{o.Stage}'"),
    };

    internal static Device DeviceOf(TrainOptions o)
    {
        if (o.Device != "cuda") return CPU;
        if (!cuda.is_available()) throw new ArgumentException("--device cuda: CUDA is not available to libtorch here");
        return CUDA;
    }

    /// <summary>
    /// The ControlLDM a stage-2 or prior run starts from when no SD checkpoint is read: tiny (fixture-sized) or full
    /// size, its UNet, VAE and CLIP filled with seeded random weights (seed derived from the run's seed and
    /// <paramref name="seedPart"/>).
    /// </summary>
    internal static ControlLDM RandomCldm(TrainOptions o, ControlMode mode, long seedPart)
    {
        var cldm = new ControlLDM(o.Tiny ? TinyCldm(mode) : ControlLdmConfig.Sd21 with { Mode = mode }, ClipTokenizer.ByteLevel());
        long s = (long)(TrainingSeeds.Derive(o.Seed, TrainingSeeds.Init, seedPart) >> 1);
        Presets.RandomInit(cldm.unet, s);
        Presets.RandomInit(cldm.vae, s + 1);
        Presets.RandomInit(cldm.clip, s + 2);
        return cldm;
    }

    /// <summary>A full-size ControlLDM with the BPE tokenizer of <c>--weights</c> (refused with the file's name when it is missing), ready for an SD checkpoint.</summary>
    internal static ControlLDM FullSizeCldm(TrainOptions o, ControlMode mode)
    {
        var vocab = Path.Combine(o.Weights, Presets.BpeVocabFile);
        if (!File.Exists(vocab))
            throw new FileNotFoundException($"{vocab}: the CLIP BPE vocabulary is missing (diffbir-lab weights fetch v2.1 brings it; or --weights DIR)");
        return new ControlLDM(ControlLdmConfig.Sd21 with { Mode = mode }, new ClipTokenizer(vocab));
    }

    /// <summary>The stage-1 SwinIR on lq [N,3,H,W] in [0, 1]: padded to 64 (×8 unshuffle, 8×8 windows), cropped back, clamped.</summary>
    internal static Tensor RunStage1(SwinIR model, Tensor lqNchw)
    {
        var lq = lqNchw.to(model.parameters().First().device);
        long h = lq.shape[2], w = lq.shape[3];
        return model.forward(ImageOps.PadToMultiplesOf(lq, 64))[.., .., ..(int)h, ..(int)w].clamp(0, 1);
    }

    /// <summary>A SwinIR: tiny (seeded random, as Presets.RandomInit) or full (the constructor's init under a seeded global generator), or loaded strictly from a checkpoint.</summary>
    internal static SwinIR MakeSwinIR(TrainOptions o, string? checkpoint, long seedPart)
    {
        var seed = (long)(TrainingSeeds.Derive(o.Seed, TrainingSeeds.Init, seedPart) >> 1);
        manual_seed(seed);
        var m = new SwinIR(o.Tiny ? TinySwinIR : SwinIRConfig.Full);
        if (o.Tiny) Presets.RandomInit(m, seed);
        if (checkpoint != null)
            using (var w = Checkpoint.Load(checkpoint))
                StateDictLoader.Load(m, w.Tensors, strict: true, sourceName: checkpoint);
        return m;
    }
}

/// <summary>Stage 1: SwinIR on first-order pairs, summed MSE (official train_stage1.py).</summary>
public sealed class Stage1Training : ITrainer
{
    readonly SwinIR _model;
    public string Stage => "stage1";
    public nn.Module Trainable => _model;
    public optim.Optimizer Optimizer { get; }
    public IReadOnlyDictionary<string, string> CheckpointMetadata { get; }
    public bool WritesSamples => false;

    public Stage1Training(TrainOptions o)
    {
        _model = Trainers.MakeSwinIR(o, o.Stage1, 1);
        _model.to(Trainers.DeviceOf(o));
        Optimizer = optim.AdamW(_model.parameters(), o.LearningRate, 0.9, 0.999, 1e-8, weight_decay: o.WeightDecay);
        CheckpointMetadata = new Dictionary<string, string> { ["stage"] = "stage1", ["network"] = o.Tiny ? "swinir-tiny" : "swinir" };
    }

    public Tensor Loss(TrainingBatch batch, ITrainingDraws draws) => Stage1Trainer.Loss(_model, batch.Gt, batch.Lq, draws);

    public Tensor Restore(Tensor lqNchw, long seed)
    {
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        _model.eval();
        var y = Trainers.RunStage1(_model, lqNchw);
        _model.train();
        return y.MoveToOuterDisposeScope();
    }

    public void Dispose() => _model.Dispose();
}

/// <summary>
/// Stage 2: IRControlNet (or Variant 5 / 6) started from the UNet of a Stable Diffusion checkpoint (tiny: seeded
/// random UNet/VAE/CLIP), the stage-1 SwinIR frozen; only the ControlNet — with the variant's added convs — learns.
/// </summary>
public sealed class Stage2Training : ITrainer
{
    readonly ControlLDM _cldm;
    readonly SwinIR _stage1;
    readonly NoiseSchedule _schedule;
    readonly int _noiseAug;
    readonly int _sampleSteps;
    RestorationPipeline? _pipe;
    public string Stage => "stage2";
    public nn.Module Trainable => _cldm.controlnet;
    public optim.Optimizer Optimizer { get; }
    public IReadOnlyDictionary<string, string> CheckpointMetadata { get; }
    public bool WritesSamples => true;
    public ControlLDM Cldm => _cldm;

    public Stage2Training(TrainOptions o)
    {
        var mode = Trainers.ParseVariant(o.Variant);
        _schedule = o.Schedule == "v2.1" ? NoiseSchedule.V2_1 : NoiseSchedule.V2;
        _noiseAug = o.NoiseAug;
        _sampleSteps = o.SampleSteps;
        if (o.Tiny || o.RandomInit)
        {
            // Seeded random SD parts; the ControlNet then starts as the official load_controlnet_from_unet (zero convs 0).
            _cldm = Trainers.RandomCldm(o, mode, 2);
            _cldm.controlnet.LoadFromUNet(_cldm.unet);
            Stage2Trainer.Prepare(_cldm);
        }
        else
        {
            _cldm = Trainers.FullSizeCldm(o, mode);
            using var sd = Checkpoint.Load(o.Sd!);
            var (_, missing, _, _) = Stage2Trainer.InitFromStableDiffusion(_cldm, sd.Tensors, o.Sd!);
            if (missing.Count > 0)
                throw new CheckpointException(o.Sd!, $"not a Stable Diffusion 2.1 checkpoint for this model: {missing.Count} keys are missing ({string.Join(", ", missing.Take(3))}…)");
        }
        _stage1 = Trainers.MakeSwinIR(o, o.Stage1, 3);
        foreach (var p in _stage1.parameters()) p.requires_grad = false;
        _stage1.eval();
        var device = Trainers.DeviceOf(o);
        _cldm.to(device);
        _stage1.to(device);
        Optimizer = optim.AdamW(_cldm.controlnet.parameters(), o.LearningRate, 0.9, 0.999, 1e-8, weight_decay: o.WeightDecay);
        CheckpointMetadata = new Dictionary<string, string>
        {
            ["stage"] = "stage2",
            [TrainingCheckpoint.ControlModeKey] = Trainers.VariantName(mode),
            ["schedule"] = o.Schedule,
            ["network"] = o.Tiny ? "controlnet-tiny" : o.RandomInit ? "controlnet (random SD: timing only)" : "controlnet",
        };
    }

    public Tensor Loss(TrainingBatch batch, ITrainingDraws draws) =>
        Stage2Trainer.Loss(_cldm, _stage1, _schedule, _noiseAug, batch.Gt, batch.Lq, batch.Prompts, draws);

    /// <summary>lq → SwinIR → the spaced sampler (cfg 1, empty prompt, seeded) → decoded image in [0, 1].</summary>
    public Tensor Restore(Tensor lqNchw, long seed)
    {
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        _cldm.eval();
        var clean = Trainers.RunStage1(_stage1, lqNchw);
        _pipe ??= new RestorationPipeline(new SwinIRCleaner(_stage1), _cldm, _schedule);
        var opts = new PipelineOptions { Sampler = "spaced", Steps = _sampleSteps, CfgScale = 1.0, PosPrompt = "", NegPrompt = "", Seed = seed };
        using var cond = _pipe.ConditionOnStage1(clean, opts);
        using var r = _pipe.Sample(cond, opts);
        var y = ((r.Decoded + 1) / 2).clamp(0, 1);
        Stage2Trainer.Prepare(_cldm);
        return y.MoveToOuterDisposeScope();
    }

    public void Dispose() { _cldm.Dispose(); _stage1.Dispose(); }
}
