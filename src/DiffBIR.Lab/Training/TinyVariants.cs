using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Data;
using DiffBIR.Lab.IO;
using DiffBIR.Lab.Metrics;
using DiffBIR.Lab.Models.Stage1;
using DiffBIR.Lab.Models.StableDiffusion;
using DiffBIR.Lab.Pipeline;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Training;

/// <summary>Settings of <see cref="TinyVariants.Run"/>.</summary>
public sealed record TinyVariantsOptions
{
    /// <summary>Variants to train: "irc" (IRControlNet), "v5" (concat features), "v6" (SFT).</summary>
    public IReadOnlyList<string> Variants { get; init; } = new[] { "irc", "v5", "v6" };
    /// <summary>Stage-2 steps, batch, crop, learning rate (null: the recipe's stage 2 from recipe.json).</summary>
    public TinyStage? Stage2 { get; init; }
    /// <summary>Held-out images of the evaluation.</summary>
    public int EvalImages { get; init; } = 8;
    /// <summary>Sampler and steps of the evaluation (null: the preset's defaults).</summary>
    public string? Sampler { get; init; }
    public int Threads { get; init; } = 1;
    public long Seed { get; init; } = 231;
    /// <summary>Train "irc" here too instead of measuring the committed controlnet.safetensors (it then reproduces it
    /// byte for byte with the recipe's stage-2 settings and thread count: a check of "same batches, same draws").</summary>
    public bool RetrainIrc { get; init; }
}

/// <summary>
/// Table 1 of the DiffBIR lab seed in miniature: IRControlNet, Variant 5 (concat features) and Variant 6 (SFT) trained
/// on the same frozen tiny prior, VAE and stage 1 (read from a tiny weights folder), with the recipe's stage-2 settings,
/// the same seed and the same batches and draws for each; then each is measured on held-out procedural images (PSNR,
/// SSIM, niqe-lab) in the tiny pipeline at s = 0. Writes <c>controlnet_{variant}.safetensors</c> and a results JSON.
/// </summary>
public static class TinyVariants
{
    public static ControlMode ModeOf(string variant) => variant switch
    {
        "irc" => ControlMode.Add,
        "v5" => ControlMode.ConcatFeatures,
        "v6" => ControlMode.Sft,
        _ => throw new ArgumentException($"variant '{variant}': expected irc, v5 or v6"),
    };

    /// <summary>Trains and measures every variant; returns the results JSON (also written to <paramref name="resultsJson"/>).</summary>
    public static JsonObject Run(string weightsDir, string outDir, string resultsJson, TinyVariantsOptions? options = null, Action<string>? log = null,
        CancellationToken ct = default)
    {
        var o = options ?? new TinyVariantsOptions();
        log ??= _ => { };
        set_num_threads(o.Threads);
        var wall = Stopwatch.StartNew();
        var recipePath = Path.Combine(weightsDir, TinyRecipe.RecipeFile);
        var (recipe, seed, images, size, scale, scheduleName, recipeStage, decay, stage1Config) = ReadRecipe(recipePath);
        var stage = o.Stage2 ?? recipeStage;
        Directory.CreateDirectory(outDir);

        using var data = new TinyTrainingData(seed, images, size, log);
        using var stage1 = new SwinIR(stage1Config);
        Load(stage1, Path.Combine(weightsDir, "stage1.safetensors"));
        stage1.eval();
        foreach (var p in stage1.parameters()) p.requires_grad = false;

        var rows = new JsonArray();
        foreach (var variant in o.Variants)
        {
            var mode = ModeOf(variant);
            var file = Path.GetFullPath(Path.Combine(outDir, $"controlnet_{variant}.safetensors"));
            var sw = Stopwatch.StartNew();
            double loss = double.NaN;
            bool committed = variant == "irc" && stage == recipeStage && !o.RetrainIrc;
            if (committed)
            {
                // The recipe's own IRControlNet: same stage-2 settings, batches and draws as the variants get here.
                file = Path.GetFullPath(Path.Combine(weightsDir, "controlnet.safetensors"));
                loss = (double?)recipe["final_losses"]?["stage2"] ?? double.NaN;
            }
            else using (var cldm = TinyRecipe.NewCldm(scale, mode, recipe["model"]!["cldm"]))
            {
                Load(cldm.vae, Path.Combine(weightsDir, "vae.safetensors"));
                Load(cldm.unet, Path.Combine(weightsDir, "unet.safetensors"));
                // Same batches and draws for every variant: the comparison differs only by the architecture.
                data.RestartSampler();
                using var draws = new SeededTrainingDraws(TinyRecipe.Stage2DrawsSeed(seed));
                loss = TinyRecipe.TrainControlNet(cldm, stage1, TinyRecipe.ScheduleOf(scheduleName), data, draws, stage, decay, Math.Max(1, stage.Steps / 4), variant, log, ct);
                TinyRecipe.SaveFloat16(cldm.controlnet, file, new Dictionary<string, string>
                {
                    ["producer"] = "DiffBIR.Lab tiny variants", ["variant"] = variant, [TrainingCheckpoint.ControlModeKey] = variant,
                });
            }
            double trainSeconds = sw.Elapsed.TotalSeconds;
            var m = Measure(weightsDir, mode, file, o, seed, size);
            log(string.Create(CultureInfo.InvariantCulture, $"{variant}: PSNR {m.Psnr:F2} dB, SSIM {m.Ssim:F4}, niqe-lab {m.Niqe:F2} ({trainSeconds:F0} s training)"));
            rows.Add(new JsonObject
            {
                ["variant"] = variant, ["mode"] = mode.ToString(), ["psnr"] = Math.Round(m.Psnr, 3), ["ssim"] = Math.Round(m.Ssim, 4),
                ["niqe_lab"] = Math.Round(m.Niqe, 3),
                ["psnr_per_image"] = Arr(m.PsnrPerImage, 3), ["ssim_per_image"] = Arr(m.SsimPerImage, 4), ["niqe_lab_per_image"] = Arr(m.NiqePerImage, 3),
                ["final_loss"] = Math.Round(loss, 6), ["train_seconds"] = Math.Round(trainSeconds, 1),
                ["sha256"] = TinyRecipe.Sha256(file),
                ["weights"] = committed ? "weights/tiny/controlnet.safetensors (the recipe's stage 2)" : $"{variant}: trained here",
            });
        }
        var result = new JsonObject
        {
            ["format"] = 1,
            ["command"] = $"diffbir-lab weights train-tiny --variants {string.Join(',', o.Variants)} --variants-steps {stage.Steps} --eval-images {o.EvalImages}",
            ["weights"] = "weights/tiny (VAE, UNet prior, stage 1 frozen; recipe.json sha256 " + TinyRecipe.Sha256(recipePath)[..12] + ")",
            ["stage2"] = new JsonObject { ["steps"] = stage.Steps, ["batch"] = stage.Batch, ["crop"] = stage.Crop, ["learning_rate"] = stage.LearningRate, ["schedule"] = scheduleName, ["seed"] = seed },
            ["evaluation"] = new JsonObject
            {
                ["images"] = $"held-out procedural {TinyTrainingData.HeldOutStart}…{TinyTrainingData.HeldOutStart + o.EvalImages - 1}, {size} px, Eq. 2 LQ",
                ["pipeline"] = $"preset tiny, task sr, ×1, s = 0, sampler {o.Sampler ?? Presets.Tiny.Defaults.Sampler}, {Presets.Tiny.Defaults.Steps} steps, seed {o.Seed}",
                ["threads"] = o.Threads,
            },
            ["rows"] = rows,
            ["wall_seconds"] = Math.Round(wall.Elapsed.TotalSeconds, 1),
            ["libtorch"] = RunInfo.LibTorchVersion,
        };
        AtomicFile.WriteAllText(resultsJson, result.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
        return result;
    }

    /// <summary>What the variants need from a tiny recipe.json; a damaged file (bad JSON, a missing part, a wrong type)
    /// is a <see cref="CheckpointException"/> naming it, not an internal error.</summary>
    public static (JsonNode Recipe, long Seed, int Images, int Size, double Scale, string Schedule, TinyStage Stage2, double DecayFraction, SwinIRConfig Stage1)
        ReadRecipe(string recipePath)
    {
        return TinyRecipe.RecipePart(recipePath, "damaged recipe", () =>
        {
            var recipe = JsonNode.Parse(File.ReadAllText(recipePath)) ?? throw new CheckpointException(recipePath, "empty recipe");
            long seed = (long)recipe["seed"]!;
            int images = (int)recipe["data"]!["images"]!, size = (int)recipe["data"]!["size"]!;
            double scale = (double)recipe["model"]!["latent_scale_factor"]!;
            string scheduleName = (string?)recipe["model"]!["schedule"] == "v2.1" ? "v2.1" : "v2";
            var s2 = recipe["stages"]!["stage2"]!;
            var stage = new TinyStage((int)s2["steps"]!, (int)s2["batch"]!, (int)s2["crop"]!, (double)s2["learning_rate"]!);
            // The recipe's learning-rate decay (recipes before it was recorded kept stage 2 at a constant rate).
            double decay = (double?)recipe["decay_fraction"] ?? 0.0;
            if (!(decay >= 0 && decay <= 1)) throw new FormatException($"decay_fraction {decay} is not in [0, 1]");
            var stage1Config = recipe["model"]!["stage1_config"] is JsonNode sc ? SwinIRConfig.FromJson(sc) : TinyRecipe.Stage1Config;
            return (recipe, seed, images, size, scale, scheduleName, stage, decay, stage1Config);
        });
    }

    /// <summary>PSNR, SSIM (vs HQ) and niqe-lab of the tiny pipeline with one ControlNet on held-out images: means and per image.</summary>
    public sealed record Scores(double Psnr, double Ssim, double Niqe, double[] PsnrPerImage, double[] SsimPerImage, double[] NiqePerImage);

    /// <summary>Scores of the tiny pipeline (weights in <paramref name="weightsDir"/>) with the given ControlNet on the
    /// first <see cref="TinyVariantsOptions.EvalImages"/> held-out images, s = 0, the preset's defaults.</summary>
    public static Scores Measure(string weightsDir, ControlMode mode, string controlNetFile, TinyVariantsOptions o, long dataSeed = 2026, int size = 128)
    {
        using var preset = Presets.Build(Presets.Tiny, RestorationTask.Sr, weightsDir,
            new BuildOptions { Upscale = 1, TinyWeightsDir = weightsDir, TinyControlNet = (mode, controlNetFile) });
        using var niqe = Metric.Get(Metric.NiqeLabName);
        var opts = preset.Preset.Defaults with { Seed = o.Seed };
        if (o.Sampler != null) opts = opts with { Sampler = o.Sampler };
        var psnr = new double[o.EvalImages]; var ssim = new double[o.EvalImages]; var nq = new double[o.EvalImages];
        for (int i = 0; i < o.EvalImages; i++)
        {
            using var scope = NewDisposeScope();
            long index = TinyTrainingData.HeldOutStart + i;
            var hq = ProceduralImages.Generate(dataSeed, index, size).unsqueeze(0);
            var lq = TinyTrainingData.DegradeOne(hq.squeeze(0), dataSeed, index).unsqueeze(0);
            using var r = preset.Restore(ImageIO.ToUInt8(lq, Quantization.Round), opts);
            var img = ImageIO.FromUInt8(r.Image);
            psnr[i] = ImageMetrics.Psnr(img, hq).mean().item<double>();
            ssim[i] = ImageMetrics.Ssim(img, hq).mean().item<double>();
            nq[i] = niqe.Score(img)[0];
        }
        return new Scores(psnr.Average(), ssim.Average(), nq.Average(), psnr, ssim, nq);
    }

    static JsonArray Arr(double[] v, int digits) => new(v.Select(x => (JsonNode?)Math.Round(x, digits)).ToArray());

    static void Load(TorchSharp.torch.nn.Module m, string path)
    {
        using var sd = Checkpoint.Load(path);
        StateDictLoader.Load(m, sd.Tensors, strict: true, sourceName: path);
    }
}
