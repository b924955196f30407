using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Diffusion;
using DiffBIR.Lab.Models;
using DiffBIR.Lab.Models.Clip;
using DiffBIR.Lab.Models.StableDiffusion;
using DiffBIR.Lab.Models.Stage1;
using DiffBIR.Lab.Pipeline;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Parity;

/// <summary>
/// e2e_bsr_v2.safetensors: the whole v2 BSR pipeline (official <c>BSRNetPipeline.run</c>) with the tiny networks, the
/// recorded noise replayed, untiled and with every tiling on (BSRNet tiles, tiled VAE encoder and decoder, latent
/// tiles). Compared per variant: stage1, c_txt, uc_txt, c_img, z, decoded (untiled only) and the uint8 image.
/// </summary>
public sealed class E2eBsrV2Case : IParityCase
{
    public string Case => "e2e_bsr_v2";
    public string Description => "v2 BSR pipeline end to end (BSRNet, ControlLDM, EDM dpm++ 3m sde, tiled VAE / diffusion)";
    public Tolerance DefaultTolerance => new(1e-4, 1e-6);

    /// <summary>The fixture's tiny pipeline (ControlLDM + BSRNet, vanilla attention as the fixtures were made).</summary>
    public static RestorationPipeline BuildPipeline(Fixture f)
    {
        var cfg = f.Config!;
        var tokenizer = new ClipTokenizer(Path.Combine(Path.GetDirectoryName(f.Path)!, "bpe_simple_vocab_16e6.txt.gz"));
        var cldm = new ControlLDM(ControlLdmConfig.FromJson(cfg["cldm"]!), tokenizer);
        cldm.LoadComponents(name => f.Weights(name), f.Path);
        cldm.AttentionMode = AttentionMode.Vanilla;
        cldm.eval();
        var net = new RRDBNet(RRDBNetConfig.FromJson(cfg["cleaner"]!));
        StateDictLoader.Load(net, f.Weights("cleaner"), sourceName: "weights.cleaner");
        return new RestorationPipeline(new BSRNetCleaner(net, (double)cfg["upscale"]!), cldm, NoiseSchedule.V2);
    }

    /// <summary>run_args[variant] of the fixture as pipeline options, with the recorded noise.</summary>
    public static PipelineOptions OptionsOf(Fixture f, string variant)
    {
        var a = f.Config!["run_args"]![variant]!;
        return new PipelineOptions
        {
            Steps = (int)a["steps"]!, Strength = (double)a["strength"]!,
            CleanerTiled = (bool)a["cleaner_tiled"]!, CleanerTileSize = (int)a["cleaner_tile_size"]!, CleanerTileStride = (int)a["cleaner_tile_stride"]!,
            VaeEncoderTiled = (bool)a["vae_encoder_tiled"]!, VaeEncoderTileSize = (int)a["vae_encoder_tile_size"]!,
            VaeDecoderTiled = (bool)a["vae_decoder_tiled"]!, VaeDecoderTileSize = (int)a["vae_decoder_tile_size"]!,
            CldmTiled = (bool)a["cldm_tiled"]!, CldmTileSize = (int)a["cldm_tile_size"]!, CldmTileStride = (int)a["cldm_tile_stride"]!,
            PosPrompt = (string)a["pos_prompt"]!, NegPrompt = (string)a["neg_prompt"]!, CfgScale = (double)a["cfg_scale"]!,
            StartPointType = (string)a["start_point_type"]! == "cond" ? StartPoint.Cond : StartPoint.Noise,
            Sampler = (string)a["sampler_type"]!, NoiseAug = (int)a["noise_aug"]!, RescaleCfg = (bool)a["rescale_cfg"]!,
            SChurn = (double)a["s_churn"]!, STmin = (double)a["s_tmin"]!, STmax = (double)a["s_tmax"]!,
            SNoise = (double)a["s_noise"]!, Eta = (double)a["eta"]!, Order = (int)a["order"]!,
            Noise = new ReplayNoise(f.In($"{variant}.noise")),
        };
    }

    /// <summary>
    /// Tolerances. No float64 run exists for e2e; the README gives: stage1 reproduced to 5e-7, c_img to 3e-6, c_txt
    /// exactly, and suggests comparing z relatively (~1e-3: |z| ≈ 5e4 because σ_max = 1e4 with random weights) and the
    /// image with a few levels. Measured (2026-11-27): z 5e-6, decoded 3.2e-6 relative, image 0 (untiled) / 1 level
    /// (tiled); we hold z and decoded (its decode) to 1e-4, 20× the measured value and 10× below the README's hint,
    /// and the image to 2 levels.
    /// </summary>
    static Tolerance TolOf(string output) => output switch
    {
        "stage1" => new(1e-5, 1e-6),
        "c_txt" or "uc_txt" => new(1e-5, 1e-6),
        "c_img" => new(1e-4, 1e-6),
        "z" or "decoded" => new(1e-4, 0),
        "image" => new(0, 2),
        _ => new(1e-4, 1e-6),
    };

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        var variants = f.Config!["run_args"]!.AsObject().Select(kv => kv.Key).ToList();
        using var pipe = BuildPipeline(f);
        foreach (var v in variants)
        {
            var o = OptionsOf(f, v);
            var r = pipe.Run(f.In("lq"), o);
            var replay = (ReplayNoise)o.Noise!;
            if (replay.Used != replay.Count)
                throw new InvalidOperationException($"{v}: used {replay.Used} noise draws, {replay.Count} recorded");
            var mine = new Dictionary<string, Tensor>
            {
                ["image"] = r.Image, ["stage1"] = r.Stage1, ["c_img"] = r.CImage, ["c_txt"] = r.CText,
                ["uc_txt"] = r.UcText, ["z"] = r.Z, ["decoded"] = r.Decoded,
            };
            foreach (var name in f.OutputNames.Where(n => n.StartsWith(v + ".", StringComparison.Ordinal)))
            {
                var key = name[(v.Length + 1)..];
                yield return mine.TryGetValue(key, out var t)
                    ? new CaseOutput(name, t, Tolerance: TolOf(key))
                    : new CaseOutput(name, torch.tensor(float.NaN));
            }
        }
    }
}

/// <summary>One step of a sampling run as the v2.0.0 fixtures record it: CFG ε, x̂₀, guided x̂₀ (when guidance
/// applied) and the state after the step.</summary>
public sealed record PaperStep(Tensor Eps, Tensor PredX0, Tensor? PredX0Guided, Tensor X);

/// <summary>
/// v2.0.0/pipeline.safetensors (Case 5 of the paper version): (A) <c>run_stage2</c> on a 64×64 BSRNet output for five
/// variants (plain, better start, better start + rgb w_mse guidance, latent mse guidance, tiled better start) with
/// per-step ε, x̂₀, guided x̂₀ and states, the decoded sample, the colour-fixed float image and its uint8; (B) the
/// full <c>Pipeline.run</c> at 512 px for BSRNet (no guidance) and SwinIR (rgb w_mse guidance). Weights of unet,
/// controlnet and vae come from sampler_guided.safetensors (weights_from).
/// <para>Every variant runs through <see cref="RestorationPipeline"/> with <see cref="PipelineOptions.PaperV2_0_0"/>
/// (the paper version is a set of options, not a pipeline of its own): (A) through
/// <see cref="RestorationPipeline.ConditionOnStage1"/> (run_stage2 gets the cleaner's output as it is, no ≥ 512 rule)
/// and <see cref="RestorationPipeline.Sample"/>, (B) through <see cref="RestorationPipeline.Run"/>. The per-step
/// records come from the step observer.</para>
/// </summary>
public sealed class V2PipelineCase : IParityCase
{
    public string Case => "v2_pipeline";
    public string Description => "paper-version (v2.0.0) pipelines: stage 2 variants with guidance / better start / tiles, and full runs";
    public Tolerance DefaultTolerance => new(3e-5, 0);

    public static (RestorationPipeline Bsr, RestorationPipeline Swin) Build(Fixture f)
    {
        var cfg = f.Config!;
        var vocab = Path.Combine(Path.GetDirectoryName(Path.GetDirectoryName(f.Path)!)!, "bpe_simple_vocab_16e6.txt.gz");
        var cldm = new ControlLDM(ControlLdmConfig.FromJson(cfg["ControlLDM"]!), new ClipTokenizer(vocab));
        cldm.LoadComponents(name => f.Weights(name), f.Path);
        cldm.AttentionMode = AttentionMode.Vanilla;
        cldm.eval();
        var bsr = new RRDBNet(RRDBNetConfig.FromJson(cfg["RRDBNet"]!));
        StateDictLoader.Load(bsr, f.Weights("bsrnet"), sourceName: "weights.bsrnet");
        var swin = new SwinIR(SwinIRConfig.FromJson(cfg["SwinIR"]!));
        StateDictLoader.Load(swin, f.Weights("swinir"), sourceName: "weights.swinir");
        return (new RestorationPipeline(new BSRNetCleaner(bsr, 4.0), cldm, NoiseSchedule.V2),
                new RestorationPipeline(new SwinIRCleaner(swin), cldm, NoiseSchedule.V2));
    }

    static Guidance.RestorationGuidance? GuidanceOf(JsonNode? g)
    {
        if (g is not JsonArray a) return null;
        var space = (string)a[4]! == "latent" ? Guidance.GuidanceSpace.Latent : Guidance.GuidanceSpace.Rgb;
        double scale = (double)a[1]!; int tStart = (int)a[2]!, tStop = (int)a[3]!, repeat = (int)a[5]!;
        return (string)a[0]! == "mse"
            ? new Guidance.MseGuidance { Scale = scale, TStart = tStart, TStop = tStop, Space = space, Repeat = repeat }
            : new Guidance.WeightedMseGuidance { Scale = scale, TStart = tStart, TStop = tStop, Space = space, Repeat = repeat };
    }

    static ReplayNoise NoiseOf(Fixture f, string variant)
    {
        var draws = new List<Tensor>();
        for (int k = 0; f.Tensors.ContainsKey($"noise.{variant}.{k}"); k++) draws.Add(f.Get($"noise.{variant}.{k}"));
        return new ReplayNoise(draws.Count == 0 ? null : torch.stack(draws));
    }

    /// <summary>The v2.0.0 options of a fixture variant (the paper preset with the variant's overrides).</summary>
    static PipelineOptions OptionsOf(JsonNode v, string posPrompt, string negPrompt, ReplayNoise noise, string cfgKey)
    {
        var o = PipelineOptions.PaperV2_0_0 with
        {
            Steps = (int)v["steps"]!, Strength = (double?)v["strength"] ?? 1.0, CfgScale = (double)v[cfgKey]!,
            PosPrompt = posPrompt, NegPrompt = negPrompt,
            StartPointType = (bool)v["better_start"]! ? StartPoint.LowFrequency : StartPoint.Noise,
            Guidance = GuidanceOf(v["guidance"]), Noise = noise,
        };
        return (bool?)v["tiled"] == true ? o.PaperTiled((int)v["tile_size"]!, (int)v["tile_stride"]!) : o;
    }

    /// <summary>A step observer that keeps what the fixtures record of every step (copies that outlive the step).</summary>
    sealed class StepRecorder
    {
        readonly List<(Tensor Eps, Tensor X0, Tensor? Guided, Tensor Zt)> _seen = new();
        public bool Observe(Sampling.StepInfo s)
        {
            static Tensor Keep(Tensor t) => t.clone().DetachFromDisposeScope();
            _seen.Add((Keep(s.Output!), Keep(s.ModelX0!), s.GuidanceApplied ? Keep(s.PredictedX0) : null, Keep(s.Zt)));
            return true;
        }
        /// <summary>The records with x = the state after each step (the next step's z_t, the final latent last).</summary>
        public IReadOnlyList<PaperStep> Steps(Tensor z) =>
            _seen.Select((s, k) => new PaperStep(s.Eps, s.X0, s.Guided, k + 1 < _seen.Count ? _seen[k + 1].Zt : z)).ToList();
    }

    static IEnumerable<CaseOutput> StepOutputs(Fixture f, string prefix, IReadOnlyList<PaperStep> steps, Tolerance tol)
    {
        foreach (var name in f.OutputNames.Where(n => n.StartsWith(prefix + ".step", StringComparison.Ordinal)))
        {
            var rest = name[(prefix.Length + 5)..];              // "{k}.what"
            int dot = rest.IndexOf('.');
            int k = int.Parse(rest[..dot]);
            var what = rest[(dot + 1)..];
            Tensor? t = k >= steps.Count ? null : what switch
            {
                "eps" => steps[k].Eps, "pred_x0" => steps[k].PredX0, "pred_x0_guided" => steps[k].PredX0Guided, "x" => steps[k].X, _ => null,
            };
            yield return t is null ? new CaseOutput(name, torch.tensor(float.NaN), Tolerance: tol) : new CaseOutput(name, t, Tolerance: tol);
        }
    }

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        var (bsr, swin) = Build(f);
        using var _ng = torch.no_grad();
        var cfg = f.Config!;
        string negPrompt = (string)cfg["neg_prompt"]!, posPrompt = (string)cfg["pos_prompt"]!;
        var textTol = new Tolerance(1e-5, 1e-6);
        yield return new CaseOutput("clip.c_txt_pos", bsr.Cldm.clip.Encode(new[] { posPrompt }), Tolerance: textTol);
        yield return new CaseOutput("clip.c_txt_neg", bsr.Cldm.clip.Encode(new[] { negPrompt }), Tolerance: textTol);

        // (A) stage 2 on the untouched x4 BSRNet output (no resize to 512)
        var lq = f.In("st2.lq_uint8").to(ScalarType.Float64).div(255.0).clamp(0, 1).to(ScalarType.Float32).permute(0, 3, 1, 2).contiguous();
        var clean = bsr.Cleaner.Network.forward(lq);
        yield return new CaseOutput("st2.clean", clean, Tolerance: new(1e-5, 0));
        var chainTol = new Tolerance(3e-5, 0);
        foreach (var v in f.MetaJson("stage2")!.AsArray())
        {
            var name = (string)v!["name"]!;
            var noise = NoiseOf(f, "st2." + name);
            var o = OptionsOf(v, posPrompt, negPrompt, noise, "cfg_scale");
            var rec = new StepRecorder();
            using var cond = bsr.ConditionOnStage1(clean, o);
            using var r = bsr.Sample(cond, o, stepObserver: rec.Observe);
            if (noise.Used != noise.Count) throw new InvalidOperationException($"st2.{name}: used {noise.Used} noise draws, {noise.Count} recorded");
            var sample = r.Decoded[.., .., ..(int)clean.shape[2], ..(int)clean.shape[3]];
            var ff = ImageOps.FinishFloat(sample, clean, lq.shape[2] * 4, lq.shape[3] * 4);
            yield return new CaseOutput($"st2.{name}.sample", sample, Tolerance: chainTol);
            yield return new CaseOutput($"st2.{name}.final_float", ff, Tolerance: chainTol);
            yield return new CaseOutput($"st2.{name}.final_uint8", r.Image, Tolerance: new(0, 1));
            foreach (var s in StepOutputs(f, $"st2.{name}", rec.Steps(r.Z), chainTol)) yield return s;
        }

        // (B) full Pipeline.run at 512 px (no float64 run exists; measured 2.1e-6, held to the chain tolerance of (A))
        foreach (var v in f.MetaJson("e2e512")!.AsArray())
        {
            var name = (string)v!["name"]!;
            var pipe = (string)v["pipe"]! == "bsrnet" ? bsr : swin;
            var noise = NoiseOf(f, "e2e." + name);
            var o = OptionsOf(v, posPrompt, negPrompt, noise, "cfg");
            var rec = new StepRecorder();
            using var r = pipe.Run(f.In($"e2e.{name}.lq_uint8"), o, stepObserver: rec.Observe);
            if (noise.Used != noise.Count) throw new InvalidOperationException($"e2e.{name}: used {noise.Used} noise draws, {noise.Count} recorded");
            yield return new CaseOutput($"e2e.{name}.stage1", r.Stage1, Tolerance: new(1e-5, 1e-6));
            yield return new CaseOutput($"e2e.{name}.final_uint8", r.Image, Tolerance: new(0, 1));
            foreach (var s in StepOutputs(f, $"e2e.{name}", rec.Steps(r.Z), chainTol)) yield return s;
        }
    }
}
