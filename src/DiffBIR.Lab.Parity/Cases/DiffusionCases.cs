using System.Text.Json.Nodes;
using DiffBIR.Lab.Diffusion;
using DiffBIR.Lab.Guidance;
using DiffBIR.Lab.Sampling;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Parity;

/// <summary>
/// samplers.safetensors: every official sampler run (v2 / v2.1, rescaled CFG, s_churn, lms order 3), replayed with the
/// recorded network outputs (<see cref="ReplayDenoiser"/>) and the recorded noise. Compared: our input x and t of every
/// network call, the per-step states, the schedule buffers and the final latent. The recorded call outputs are our
/// replayed answers, so they are reported as skipped (nothing of ours to compare).
/// </summary>
public sealed class SamplersCase : IParityCase
{
    public string Case => "samplers";
    public string Description => "all samplers replayed against the recorded ControlLDM calls (x, t, steps, buffers, z)";
    public Tolerance DefaultTolerance => new(1e-5, 0);

    /// <summary>Result of one replayed run (used by the tests too).</summary>
    public sealed record Replay(string Run, Sampler Sampler, Tensor Z, IReadOnlyList<Tensor> Steps, ReplayDenoiser Model, int NoiseUsed, int NoiseRecorded);

    public static SamplerOptions OptionsOf(Fixture f, JsonNode run)
    {
        double cfg = double.Parse(f.Metadata["cfg_scale"], System.Globalization.CultureInfo.InvariantCulture);
        var o = new SamplerOptions(CfgScale: cfg, RescaleCfg: (bool)run["rescale_cfg"]!);
        if (run["edm_params"] is JsonObject p)
            o = o with
            {
                SChurn = (double)p["s_churn"]!, STmin = (double)p["s_tmin"]!, STmax = (double)p["s_tmax"]!,
                SNoise = (double)p["s_noise"]!, Eta = (double)p["eta"]!, Order = (int)p["order"]!,
            };
        return o;
    }

    public static Replay ReplayRun(Fixture f, string name, JsonNode run)
    {
        var schedule = (string)run["diffusion"]! == "v2.1" ? NoiseSchedule.V2_1 : NoiseSchedule.V2;
        var sampler = Samplers.Create((string)run["sampler"]!, schedule, OptionsOf(f, run));
        int steps = int.Parse(f.Metadata["steps"]);
        var outs = new List<Tensor>();
        for (int k = 0; f.Tensors.ContainsKey($"out.{name}.call.{k:00}.out"); k++) outs.Add(f.Out($"{name}.call.{k:00}.out"));
        var model = new ReplayDenoiser(outs);
        var cfg = new CfgDenoiser(model,
            new Conditioning(f.In("cond.c_txt"), f.In("cond.c_img")),
            new Conditioning(f.In("uncond.c_txt"), f.In("uncond.c_img")));
        var noise = new ReplayNoise(f.Tensors.GetValueOrDefault($"in.{name}.noise"));
        var stepper = new Stages.SampleStep(sampler, cfg);
        using var state = stepper.Start(f.In("x_T"), steps, noise, recordSteps: true);
        var z = SamplingLoop.Run(stepper, state)!;
        var records = state.Records.Select(t => t.clone()).ToList();
        return new Replay(name, sampler, z, records, model, noise.Used, noise.Count);
    }

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        var runs = f.MetaJson("runs")!.AsObject();
        foreach (var (name, run) in runs)
        {
            var tol = ToleranceOf(run!);
            Replay rep;
            string? error = null;
            try { rep = ReplayRun(f, name, run!); }
            catch (Exception e) { error = e.GetType().Name + ": " + e.Message; rep = null!; Console.Error.WriteLine($"samplers: run {name} failed: {e.Message}"); }
            foreach (var o in f.OutputNames.Where(o => o.StartsWith(name + ".", StringComparison.Ordinal)))
            {
                var rest = o[(name.Length + 1)..];
                // a longer run name sharing this prefix (v2.edm_euler vs v2.edm_euler.s_churn=2.0) owns its own outputs
                if (!(rest == "z" || rest.StartsWith("step.") || rest.StartsWith("call.") || rest.StartsWith("buf."))) continue;
                if (error != null) { yield return new CaseOutput(o, torch.tensor(float.NaN), Tolerance: tol); continue; }
                if (rest == "z") yield return new CaseOutput(o, rep.Z, Tolerance: tol);
                else if (rest.StartsWith("step."))
                {
                    int k = int.Parse(rest[5..]);
                    yield return k < rep.Steps.Count ? new CaseOutput(o, rep.Steps[k], Tolerance: tol) : new CaseOutput(o, torch.tensor(float.NaN), Tolerance: tol);
                }
                else if (rest.StartsWith("buf."))
                {
                    var bufs = rep.Sampler.Buffers(int.Parse(f.Metadata["steps"]));
                    var b = rest[4..];
                    yield return bufs.TryGetValue(b, out var t) ? new CaseOutput(o, t, Tolerance: new(0, 0)) : new CaseOutput(o, torch.tensor(float.NaN));
                }
                else
                {
                    var parts = rest.Split('.');
                    int k = int.Parse(parts[1]);
                    if (parts[2] == "out") { yield return CaseOutput.Skip(o, "recorded network output, replayed as the model's answer"); continue; }
                    if (k >= rep.Model.Calls) { yield return new CaseOutput(o, torch.tensor(float.NaN), Tolerance: tol); continue; }
                    var actual = parts[2] == "x" ? rep.Model.Xs[k] : rep.Model.Ts[k];
                    var ctol = parts[2] == "t" ? (actual.dtype == ScalarType.Int64 ? new Tolerance(0, 0) : new Tolerance(1e-6, 0)) : tol;
                    yield return new CaseOutput(o, actual, Tolerance: ctol);
                }
            }
            if (error is null && rep.NoiseUsed != rep.NoiseRecorded)
                throw new InvalidOperationException($"{name}: used {rep.NoiseUsed} noise draws, {rep.NoiseRecorded} recorded");
        }
    }

    /// <summary>
    /// The replay feeds the recorded network outputs back, so only our own float32 arithmetic differs from the official
    /// run (the README's f32-vs-f64 max_rel, 8.7e-7 … 3.9e-3 per run, also contains the network's sensitivity). One
    /// rtol for every run: 1e-5, about 10× the smallest per-run f32-vs-f64 max_rel (v2.1.spaced.rescale, 8.7e-7).
    /// </summary>
    public static Tolerance ToleranceOf(JsonNode run) => new(1e-5, 0);
}

/// <summary>guidance.safetensors: MSE and weighted-MSE guidance (g, loss, weight map) on even and odd sizes.</summary>
public sealed class GuidanceCase : IParityCase
{
    public string Case => "guidance";
    public string Description => "restoration guidance g = −∂L/∂x̂₀·s·3000 and the weight map";
    public Tolerance DefaultTolerance => new(1e-5, 0);

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        var c = f.Config!;
        double scale = (double)c["scale"]!;
        int t = (int)c["t_passed"]!;
        foreach (var size in new[] { "even", "odd" })
        {
            var target = f.In($"{size}.target"); var pred = f.In($"{size}.pred_x0");
            var mse = new MseGuidance { Scale = scale, TStart = (int)c["t_start"]!, TStop = (int)c["t_stop"]! };
            var (g, loss) = mse.Gradient(target, pred, t);
            yield return new CaseOutput($"{size}.MSEGuidance.g", g);
            yield return new CaseOutput($"{size}.MSEGuidance.loss", torch.tensor(new[] { (float)loss }));
            if (!f.Tensors.ContainsKey($"out.{size}.WeightedMSEGuidance.g")) continue;   // the official code raises (odd size)
            var w = new WeightedMseGuidance { Scale = scale, TStart = (int)c["t_start"]!, TStop = (int)c["t_stop"]! };
            yield return new CaseOutput($"{size}.WeightedMSEGuidance.weight", w.Weight(target));
            var (gw, lw) = w.Gradient(target, pred, t);
            yield return new CaseOutput($"{size}.WeightedMSEGuidance.g", gw);
            yield return new CaseOutput($"{size}.WeightedMSEGuidance.loss", torch.tensor(new[] { (float)lw }));
        }
    }
}

/// <summary>v2.0.0/weight_map.safetensors: the weight map on several sizes and the MSE / weighted-MSE guidance.</summary>
public sealed class V2WeightMapCase : IParityCase
{
    public string Case => "v2_weight_map";
    public string Description => "v2.0.0 cond_fn: weight map 1 − tanh(2×2 patch sum of Sobel magnitudes), g and loss";
    public Tolerance DefaultTolerance => new(1e-5, 0);

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        for (int i = 0; f.Tensors.ContainsKey($"in.wmap{i}.image"); i++)
            if (f.Tensors.ContainsKey($"out.wmap{i}.weight"))
                yield return new CaseOutput($"wmap{i}.weight", GradientMap.WeightMap(f.In($"wmap{i}.image"), 2));
        var ctor = f.MetaJson("guidance_ctor")!;
        int t = int.Parse(f.Metadata["guidance_t"]);
        var target = f.In("guid.target_x0"); var pred = f.In("guid.pred_x0");
        var mse = new MseGuidance { Scale = (double)ctor["scale"]!, TStart = (int)ctor["t_start"]!, TStop = (int)ctor["t_stop"]! };
        var (g, l) = mse.Gradient(target, pred, t);
        yield return new CaseOutput("mse.g", g);
        yield return new CaseOutput("mse.loss", torch.tensor(l, ScalarType.Float64));
        var w = new WeightedMseGuidance { Scale = (double)ctor["scale"]!, TStart = (int)ctor["t_start"]!, TStop = (int)ctor["t_stop"]! };
        var (gw, lw) = w.Gradient(target, pred, t);
        yield return new CaseOutput("wmse.g", gw);
        yield return new CaseOutput("wmse.loss", torch.tensor(lw, ScalarType.Float64));
        yield return new CaseOutput("wmse.weight", w.Weight(target));
    }
}

/// <summary>v2.0.0/spaced_schedule.safetensors: the respaced DDPM schedule for several step counts.</summary>
public sealed class V2SpacedScheduleCase : IParityCase
{
    public string Case => "v2_spaced_schedule";
    public string Description => "SpacedSampler.make_schedule(n): timesteps and float32 buffers from float64";
    public Tolerance DefaultTolerance => new(0, 0);

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        var s = NoiseSchedule.V2;
        var (sa, s1ma) = s.Buffers();
        yield return new CaseOutput("diffusion.sqrt_alphas_cumprod", sa);
        yield return new CaseOutput("diffusion.sqrt_one_minus_alphas_cumprod", s1ma);
        var sampler = new SpacedSampler(s);
        foreach (var name in f.OutputNames.Where(n => n.StartsWith("s") && n.EndsWith(".timesteps")))
        {
            var prefix = name[..name.IndexOf('.')];
            int n = int.Parse(prefix[1..]);
            var bufs = sampler.Schedule64(n, out var ts);
            yield return new CaseOutput($"{prefix}.timesteps", torch.tensor(ts.Select(x => (long)x).ToArray()));
            foreach (var (k, v) in bufs)
                if (f.Tensors.ContainsKey($"out.{prefix}.{k}"))
                    yield return new CaseOutput($"{prefix}.{k}", torch.tensor(v, ScalarType.Float64).to(ScalarType.Float32));
        }
    }
}
