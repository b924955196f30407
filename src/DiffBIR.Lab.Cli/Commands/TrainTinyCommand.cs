using System.ComponentModel;
using DiffBIR.Lab.Pipeline;
using DiffBIR.Lab.Training;
using Spectre.Console;
using Spectre.Console.Cli;
using TorchSharp;

namespace DiffBIR.Lab.Cli.Commands;

public sealed class TrainTinySettings : CommandSettings
{
    [CommandOption("-o|--output <DIR>")] [Description("Where the weights and recipe.json go (default: the repository's weights/tiny).")]
    public string? Output { get; set; }
    [CommandOption("--seed <N>")] [Description("Seed of data, initialisation and every draw (default 2026, the committed weights).")]
    public long Seed { get; set; } = 2026;
    [CommandOption("--threads <N>")] [Description("torch threads, fixed for the run; the weights depend on it (default 1, the committed weights: these small tensors run faster on one thread).")]
    public int Threads { get; set; } = 1;
    [CommandOption("--steps <N>")] [Description("Smoke run: N steps per stage on 8 images instead of the recipe (not the committed weights).")]
    public int? Steps { get; set; }

    [CommandOption("--stage <NAME=STEPS,BATCH,CROP,LR>")] [Description("Override one stage of the recipe (vae, prior, stage1, stage2), e.g. --stage vae=1500,4,128,0.001; repeatable. Not the committed weights.")]
    public string[] Stages { get; set; } = Array.Empty<string>();
    [CommandOption("--schedule <NAME>")] [Description("Schedule of the prior and IRControlNet: v2.1 (default: zero terminal SNR, v-prediction) or v2 (ε).")]
    public string Schedule { get; set; } = "v2.1";
    [CommandOption("--stage1-scale <N>")] [Description("Pixel-unshuffle factor of the stage-1 SwinIR: 2 (default), 4 or 8 (the released v1 SwinIR's).")]
    public int Stage1Scale { get; set; } = 2;
    [CommandOption("--stop-after <STAGE>")] [Description("Pilot: stop after vae, prior or stage1 (held-out checks are logged; nothing is written).")]
    public string? StopAfter { get; set; }
    [CommandOption("--images <N>")] [Description("Training images (procedural indices 0 … N−1; default 512).")]
    public int? Images { get; set; }

    [CommandOption("--variants <LIST>")] [Description("Do not train the recipe: train and measure IRControlNet variants (irc,v5,v6) on the frozen prior, VAE and stage 1 of the weights folder (Table 1 in miniature, docs/tiny-preset.md).")]
    public string? Variants { get; set; }
    [CommandOption("--variants-steps <N>")] [Description("With --variants: stage-2 steps per variant (default: the recipe's).")]
    public int? VariantsSteps { get; set; }
    [CommandOption("--variants-out <DIR>")] [Description("With --variants: where controlnet_{variant}.safetensors go (default out/tiny-variants).")]
    public string VariantsOut { get; set; } = Path.Combine("out", "tiny-variants");
    [CommandOption("--variants-json <FILE>")] [Description("With --variants: the results JSON (default docs/tiny-variants.json).")]
    public string VariantsJson { get; set; } = Path.Combine("docs", "tiny-variants.json");

    [CommandOption("--evaluate")] [Description("Do not train: measure the weights in the output folder on held-out images (docs/tiny-preset.md).")]
    public bool Evaluate { get; set; }
    [CommandOption("--eval-images <N>")] [Description("Held-out images of --evaluate (default 16).")]
    public int EvalImages { get; set; } = 16;
    [CommandOption("--grid <PNG>")] [Description("With --evaluate: write the image grid (LQ, stage 1, stage 2 at s = 0 and at the largest s, HQ) here.")]
    public string? Grid { get; set; }
    [CommandOption("--eval-sampler <NAME>")] [Description("With --evaluate: the sampler of the main measurements (default: the preset's).")]
    public string? EvalSampler { get; set; }
    [CommandOption("--sweep-samplers <LIST>")] [Description("With --evaluate: comma-separated samplers of the guidance sweep, 'none' to skip (default: every sampler).")]
    public string? SweepSamplers { get; set; }
    [CommandOption("--report <MD>")] [Description("With --evaluate: write the markdown report here too.")]
    public string? Report { get; set; }

    public override ValidationResult Validate()
    {
        if (Seed < 0) return ValidationResult.Error($"--seed: must be ≥ 0 (got {Seed})");
        if (Threads < 1 || Threads > 256) return ValidationResult.Error($"--threads: must be in 1…256 (got {Threads})");
        if (EvalImages < 1) return ValidationResult.Error($"--eval-images: must be ≥ 1 (got {EvalImages})");
        if (Steps is < 1) return ValidationResult.Error($"--steps: must be ≥ 1 (got {Steps})");
        if (Schedule is not ("v2" or "v2.1")) return ValidationResult.Error($"--schedule: expected v2 or v2.1 (got {Schedule})");
        if (Stage1Scale is not (2 or 4 or 8)) return ValidationResult.Error($"--stage1-scale: expected 2, 4 or 8 (got {Stage1Scale})");
        if (StopAfter is { } sa && sa is not ("vae" or "prior" or "stage1")) return ValidationResult.Error($"--stop-after: expected vae, prior or stage1 (got {sa})");
        if (Variants is { } vs && vs.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries) is var names
            && (names.Length == 0 || names.Any(v => v is not ("irc" or "v5" or "v6"))))
            return ValidationResult.Error($"--variants: expected a comma-separated list of irc, v5, v6 (got {vs})");
        if (VariantsSteps is < 1) return ValidationResult.Error($"--variants-steps: must be ≥ 1 (got {VariantsSteps})");
        if (Images is < 1) return ValidationResult.Error($"--images: must be ≥ 1 (got {Images})");
        foreach (var st in Stages)
            if (ParseStage(st, out _, out _) is { } err) return ValidationResult.Error($"--stage {st}: {err}");
        if (Output is { } o && File.Exists(o)) return ValidationResult.Error($"--output: {o} is a file, not a folder");
        return ValidationResult.Success();
    }

    /// <summary>Parses NAME=STEPS,BATCH,CROP,LR; returns an error text or null.</summary>
    public static string? ParseStage(string text, out string name, out TinyStage stage)
    {
        name = ""; stage = new TinyStage(0, 0, 0, 0);
        var eq = text.Split('=', 2);
        if (eq.Length != 2 || eq[0] is not ("vae" or "prior" or "stage1" or "stage2")) return "expected NAME=STEPS,BATCH,CROP,LR with NAME vae, prior, stage1 or stage2";
        var parts = eq[1].Split(',');
        var inv = System.Globalization.CultureInfo.InvariantCulture;
        if (parts.Length != 4 || !int.TryParse(parts[0], inv, out int steps) || !int.TryParse(parts[1], inv, out int batch) || !int.TryParse(parts[2], inv, out int crop)
            || !double.TryParse(parts[3], System.Globalization.NumberStyles.Float, inv, out double lr))
            return "expected four numbers STEPS,BATCH,CROP,LR";
        if (steps < 1 || batch < 1 || crop < 8 || crop % 8 != 0 || crop > 128 || !(lr > 0) || !double.IsFinite(lr))
            return "steps and batch must be ≥ 1, crop a multiple of 8 in 8…128, LR a positive number";
        name = eq[0]; stage = new TinyStage(steps, batch, crop, lr);
        return null;
    }
}

/// <summary>
/// <c>diffbir-lab weights train-tiny</c>: trains the tiny DiffBIR (VAE → UNet prior → stage 1 → IRControlNet) on
/// procedural images with <see cref="TinyRecipe"/> and writes weights/tiny/*.safetensors and recipe.json.
/// </summary>
public sealed class TrainTinyCommand : Command<TrainTinySettings>
{
    public override int Execute(CommandContext context, TrainTinySettings s, CancellationToken ct)
    {
        var output = s.Output ?? Path.Combine(Path.GetDirectoryName(Presets.FindManifest())!, "tiny");
        if (s.Variants is { } variants)
        {
            var recipeStage = TinyVariants.ReadRecipe(Path.Combine(output, TinyRecipe.RecipeFile)).Stage2;
            var stage = recipeStage with { Steps = s.VariantsSteps ?? recipeStage.Steps };
            var vo = new TinyVariantsOptions
            {
                Variants = variants.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries), Stage2 = stage,
                EvalImages = s.EvalImages, Sampler = s.EvalSampler, Threads = s.Threads,
            };
            var table = TinyVariants.Run(output, s.VariantsOut, s.VariantsJson, vo, line => AnsiConsole.WriteLine(line), ct);
            Console.WriteLine(table.ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }));
            return 0;
        }
        if (s.Evaluate)
        {
            torch.set_num_threads(s.Threads);
            using var preset = Presets.Build(Presets.Tiny, RestorationTask.Sr, output, new BuildOptions { Upscale = 1, TinyWeightsDir = output });
            var sweep = s.SweepSamplers is null ? null : s.SweepSamplers == "none" ? Array.Empty<string>() : s.SweepSamplers.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
            var report = TinyRecipeEvaluation.Run(preset, new TinyEvaluationOptions { Images = s.EvalImages, DataSeed = s.Seed, SweepImages = Math.Min(2, s.EvalImages), SweepSamplers = sweep, Sampler = s.EvalSampler },
                s.Grid, line => AnsiConsole.WriteLine(line));
            Console.WriteLine(report);
            if (s.Report != null) DiffBIR.Lab.AtomicFile.WriteAllText(s.Report, report);
            return 0;
        }
        var options = (s.Steps is int n ? TinyRecipeOptions.Short(n) : new TinyRecipeOptions()) with
        {
            Seed = s.Seed, Threads = s.Threads, Schedule = s.Schedule, Stage1Scale = s.Stage1Scale, StopAfter = s.StopAfter,
        };
        if (s.Images is int images) options = options with { Images = images };
        foreach (var st in s.Stages)
        {
            TrainTinySettings.ParseStage(st, out var name, out var stage);
            options = name switch
            {
                "vae" => options with { Vae = stage }, "prior" => options with { Prior = stage },
                "stage1" => options with { Stage1 = stage }, _ => options with { Stage2 = stage },
            };
        }
        AnsiConsole.WriteLine($"training the tiny DiffBIR into {output} (seed {s.Seed}, {s.Threads} threads{(s.Steps is int k ? $", smoke run: {k} steps per stage" : "")})");
        var result = TinyRecipe.Train(output, options, line => AnsiConsole.WriteLine(line), ct);
        if (options.StopAfter != null)
        {
            foreach (var (key, v) in result.FinalLosses) AnsiConsole.WriteLine($"{key}: {v.ToString(System.Globalization.CultureInfo.InvariantCulture)}");
            return 0;
        }
        foreach (var (file, sha) in result.Sha256) AnsiConsole.WriteLine($"{sha}  {file}");
        AnsiConsole.WriteLine($"recipe: {result.RecipePath}");
        return 0;
    }
}
