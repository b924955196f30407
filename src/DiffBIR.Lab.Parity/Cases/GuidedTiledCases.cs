using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Diffusion;
using DiffBIR.Lab.Guidance;
using DiffBIR.Lab.Models;
using DiffBIR.Lab.Models.StableDiffusion;
using DiffBIR.Lab.Pipeline;
using DiffBIR.Lab.Sampling;
using DiffBIR.Lab.Stages;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Parity;

/// <summary>The tiny ControlLDM of the v2.0.0 fixtures (UNet, ControlNet and VAE loaded strictly; CLIP left random).</summary>
public static class V2TinyModel
{
    /// <summary>Builds it from a fixture's <c>config.ControlLDM</c> and loads <c>weights.unet/controlnet/vae</c>
    /// (following <c>weights_from</c>); vanilla attention, eval mode, as the fixtures were made.</summary>
    public static ControlLDM Load(Fixture f)
    {
        var m = new ControlLDM(ControlLdmConfig.FromJson(f.Config!["ControlLDM"]!));
        StateDictLoader.Load(m.unet, f.Weights("unet"), sourceName: f.Path + " weights.unet");
        StateDictLoader.Load(m.controlnet, f.Weights("controlnet"), sourceName: f.Path + " weights.controlnet");
        var vae = f.Weights("vae");
        if (vae.Count > 0) StateDictLoader.Load(m.vae, vae, sourceName: f.Path + " weights.vae");
        m.AttentionMode = AttentionMode.Vanilla;
        m.eval();
        return m;
    }

    /// <summary>Official guidance spec [loss, scale, t_start, t_stop, space, repeat] → our guidance.</summary>
    public static RestorationGuidance GuidanceOf(JsonNode spec)
    {
        var a = spec.AsArray();
        var space = (string)a[4]! == "latent" ? GuidanceSpace.Latent : GuidanceSpace.Rgb;
        double scale = (double)a[1]!;
        int tStart = (int)a[2]!, tStop = (int)a[3]!, repeat = (int)a[5]!;
        return (string)a[0]! switch
        {
            "mse" => new MseGuidance { Scale = scale, TStart = tStart, TStop = tStop, Space = space, Repeat = repeat },
            "w_mse" => new WeightedMseGuidance { Scale = scale, TStart = tStart, TStop = tStop, Space = space, Repeat = repeat },
            var l => throw new ArgumentException($"unknown guidance loss '{l}'"),
        };
    }

    /// <summary>The recorded draws noise.&lt;run&gt;.0, 1, … stacked (null when there are none).</summary>
    public static Tensor? Noise(Fixture f, string run)
    {
        var draws = new List<Tensor>();
        for (int k = 0; f.Tensors.TryGetValue($"noise.{run}.{k}", out var t); k++) draws.Add(t);
        return draws.Count == 0 ? null : torch.stack(draws);
    }

    /// <summary>Per-step values seen by the observer of a spaced run (copies that outlive the step).</summary>
    public sealed record StepValues(Tensor Eps, Tensor PredX0, Tensor? PredX0Guided, double? Loss);

    /// <summary>Runs the spaced sampler through the stage loop and records eps, x̂₀, guided x̂₀, loss and z per step.</summary>
    public static (Tensor Z, List<StepValues> Steps, List<Tensor> Xs) RunSpaced(SampleStep stepper, Tensor xT, int steps, INoiseSource noise, Guide? guide)
    {
        var values = new List<StepValues>();
        using var state = stepper.Start(xT, steps, noise, recordSteps: true);
        var z = SamplingLoop.Run(stepper, state, guide, info =>
        {
            values.Add(new StepValues(info.Output!.clone().MoveToOuterDisposeScope(), info.ModelX0!.clone().MoveToOuterDisposeScope(),
                info.GuidanceApplied ? info.PredictedX0.clone().MoveToOuterDisposeScope() : null, info.GuidanceLoss));
            return true;
        })!;
        var xs = state.Records.Select(r => r.clone()).ToList();
        return (z, values, xs);
    }
}

/// <summary>
/// v2.0.0/sampler_guided.safetensors (Case 3): the official v2.0.0 SpacedSampler with the real tiny ControlLDM,
/// CFG 4, 5 steps, from the recorded x_T and noise, without guidance and with MSE / weighted-MSE restoration guidance
/// in rgb space (gradient through the VAE decoder) and latent space (target re-encoded with posterior sampling, one
/// recorded draw per repeat), repeat 2 and a guidance window. Built from the stage API (SampleStep, GuideStage).
/// Every out.* is compared (eps, pred_x0, pred_x0_guided, x per step and z), plus the per-step guidance loss of the
/// metadata. Tolerance: rtol 1e-5 of max|ref|, about 6× the largest float32-vs-float64 error of the file (1.85e-6).
/// </summary>
public sealed class V2SamplerGuidedCase : IParityCase
{
    public string Case => "v2_sampler_guided";
    public string Description => "v2.0.0 SpacedSampler with the tiny ControlLDM: no guidance, MSE/WMSE in rgb and latent space, repeat, window";
    public Tolerance DefaultTolerance => new(1e-5, 0);

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        using var model = V2TinyModel.Load(f);
        var cfg = f.Config!;
        var kw = cfg["sample_kwargs"]!;
        int steps = (int)kw["steps"]!;
        var pos = new Conditioning(f.In("cond.c_txt"), f.In("cond.c_img"));
        var neg = new Conditioning(f.In("uncond.c_txt"), f.In("uncond.c_img"));
        var sampler = Samplers.Create("spaced", NoiseSchedule.V2, new SamplerOptions(CfgScale: (double)kw["cfg_scale"]!));
        var stepper = new SampleStep(sampler, model, pos, neg);
        foreach (var v in f.MetaJson("variants")!.AsArray())
        {
            var name = (string)v!["name"]!;
            if ((string)v["status"]! != "ok") continue;   // g_wmse_latent: the official code raises; nothing recorded
            var noise = new ReplayNoise(V2TinyModel.Noise(f, name));
            Guide? guide = v["guidance"] is JsonArray spec ? GuideStage.For(model, V2TinyModel.GuidanceOf(spec), f.In("clean"), noise) : null;
            (Tensor Z, List<V2TinyModel.StepValues> Steps, List<Tensor> Xs) r;
            using (torch.no_grad()) r = V2TinyModel.RunSpaced(stepper, f.In("x_T"), steps, noise, guide);
            if (noise.Used != noise.Count) throw new InvalidOperationException($"{name}: used {noise.Used} noise draws, {noise.Count} recorded");
            yield return new CaseOutput($"{name}.z", r.Z);
            var losses = new List<float>(); var expectedLosses = new List<float>();
            for (int k = 0; k < steps; k++)
            {
                var s = r.Steps[k];
                yield return new CaseOutput($"{name}.step{k}.eps", s.Eps);
                yield return new CaseOutput($"{name}.step{k}.pred_x0", s.PredX0);
                yield return new CaseOutput($"{name}.step{k}.x", r.Xs[k]);
                if (f.Tensors.ContainsKey($"out.{name}.step{k}.pred_x0_guided"))
                    yield return s.PredX0Guided is null
                        ? new CaseOutput($"{name}.step{k}.pred_x0_guided", torch.tensor(float.NaN))
                        : new CaseOutput($"{name}.step{k}.pred_x0_guided", s.PredX0Guided);
                var gl = v["steps"]![k]!["g_loss"];
                if (gl is not null) { expectedLosses.Add((float)(double)gl); losses.Add((float)(s.Loss ?? double.NaN)); }
            }
            if (expectedLosses.Count > 0)
                yield return new CaseOutput($"{name}.g_loss(metadata)", torch.tensor(losses.ToArray()), Expected: torch.tensor(expectedLosses.ToArray()));
        }
    }
}

/// <summary>
/// v2.0.0/tiled.safetensors (Case 4): sliding windows and gaussian weights, tiled noise prediction
/// (<see cref="TiledDenoiser"/> inside CFG) against the official <c>predict_noise_tiled</c>, the untiled reference, and
/// a 3-step tiled spaced sampling run. Weights from sampler_guided.safetensors (<c>weights_from</c>).
/// Tolerance: rtol 1e-5 of max|ref| (float32-vs-float64: 2.5e-6); windows exact; weights to 1e-12 (float64).
/// </summary>
public sealed class V2TiledCase : IParityCase
{
    public string Case => "v2_tiled";
    public string Description => "v2.0.0 tiled noise prediction (gaussian-blended latent tiles, CFG) and tiled spaced sampling";
    public Tolerance DefaultTolerance => new(1e-5, 0);

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        var cfg = f.Config!;
        int tile = (int)cfg["tile_size"]! / 8, stride = (int)cfg["tile_stride"]! / 8;
        int h = (int)cfg["latent_hw"]![0]!, w = (int)cfg["latent_hw"]![1]!;
        var windows = Tiling.SlidingWindows(h, w, tile, stride);
        var win = new long[windows.Count, 4];
        for (int i = 0; i < windows.Count; i++)
            (win[i, 0], win[i, 1], win[i, 2], win[i, 3]) = (windows[i].Top, windows[i].Bottom, windows[i].Left, windows[i].Right);
        yield return new CaseOutput("sliding_windows", torch.tensor(win), Tolerance: new(0, 0));
        yield return new CaseOutput("gaussian_weights_f64", Tiling.GaussianWeightsTensor(tile, tile, ScalarType.Float64).reshape(tile, tile), Tolerance: new(1e-12, 0));

        using var model = V2TinyModel.Load(f);
        var pos = new Conditioning(f.In("cond.c_txt"), f.In("c_img"));
        var neg = new Conditioning(f.In("uncond.c_txt"), f.In("c_img"));
        double cfgScale = (double)cfg["cfg_scale"]!;
        var tiled = new TiledDenoiser(model, tile, stride);
        using (torch.no_grad())
        {
            var req = new ModelRequest
            {
                X = f.In("x_t"), T = f.In("t"), Step = 0, Timestep = (int)f.In("t")[0].item<long>(), CfgScale = cfgScale,
                ToX0 = e => e, FromX0 = x => x,
            };
            yield return new CaseOutput("predict_noise_tiled.eps", new CfgDenoiser(tiled, pos, neg).Predict(req));
            yield return new CaseOutput("predict_noise_untiled.eps", new CfgDenoiser(model, pos, neg).Predict(req));

            int steps = (int)cfg["steps"]!;
            var sampler = Samplers.Create("spaced", NoiseSchedule.V2, new SamplerOptions(CfgScale: cfgScale));
            var noise = new ReplayNoise(V2TinyModel.Noise(f, "tiled_sample"));
            var r = V2TinyModel.RunSpaced(new SampleStep(sampler, tiled, pos, neg), f.In("x_T"), steps, noise, null);
            if (noise.Used != noise.Count) throw new InvalidOperationException($"tiled_sample: used {noise.Used} noise draws, {noise.Count} recorded");
            yield return new CaseOutput("tiled_sample.z", r.Z);
            for (int k = 0; k < steps; k++)
            {
                yield return new CaseOutput($"tiled_sample.step{k}.eps", r.Steps[k].Eps);
                yield return new CaseOutput($"tiled_sample.step{k}.pred_x0", r.Steps[k].PredX0);
                yield return new CaseOutput($"tiled_sample.step{k}.x", r.Xs[k]);
            }
        }
    }
}
