using DiffBIR.Lab.Diffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Sampling;

/// <summary>
/// The official sampler options (inference.py arguments). Defaults are the official defaults; the EDM values are
/// the ones the pipeline passes (<c>s_tmax=300</c>, <c>eta=1</c>, <c>order=1</c>).
/// </summary>
public sealed record SamplerOptions(
    double CfgScale = 6.0,
    bool RescaleCfg = false,
    double SChurn = 0.0,
    double STmin = 0.0,
    double STmax = 300.0,
    double SNoise = 1.0,
    double Eta = 1.0,
    int Order = 1);

/// <summary>
/// A sampler = a timestep / σ schedule (<see cref="Buffers"/>) + an update rule that turns one model evaluation into
/// the next state. The update rule is written as a plain loop over the schedule (k-diffusion style) that yields a
/// <see cref="ModelRequest"/> wherever it needs the network; <see cref="SamplerRun"/> drives it one evaluation at a
/// time, so a caller can put its own code (guidance, observers, a different network) between evaluations.
/// </summary>
public abstract class Sampler
{
    /// <summary>The official <c>sampler_type</c> string, e.g. "spaced", "ddim", "dpm++_m2", "edm_dpm++_3m_sde".</summary>
    public abstract string Name { get; }
    public NoiseSchedule Schedule { get; }
    public SamplerOptions Options { get; }
    public Parameterization Parameterization => Schedule.Parameterization;

    protected Sampler(NoiseSchedule schedule, SamplerOptions? options)
    {
        Schedule = schedule; Options = options ?? new SamplerOptions();
    }

    /// <summary>The sampler's schedule buffers for <paramref name="steps"/> steps, named and typed like the official
    /// registered buffers (float32, computed in float64 first where the official code uses numpy).</summary>
    public abstract IReadOnlyDictionary<string, Tensor> Buffers(int steps);

    /// <summary>A one-line caution for a run of <paramref name="steps"/> steps, recorded in its notes (null: none).
    /// Only <see cref="EdmHeun"/> has one so far (its first-step factor on the official σ schedule).</summary>
    public virtual string? Advisory(int steps) => null;

    /// <summary>Begins sampling from x_T (not modified; the run keeps its own copy).</summary>
    public SamplerRun Start(Tensor xT, int steps, INoiseSource noise, bool recordSteps = false)
    {
        if (steps < 1) throw new ArgumentOutOfRangeException(nameof(steps), steps, "at least one step");
        var ctx = new SamplerContext(noise, recordSteps);
        return new SamplerRun(this, ctx, xT, steps);
    }

    /// <summary>The update rule: yields one request per network evaluation; reads the answer from
    /// <see cref="SamplerContext.Output"/> / <see cref="SamplerContext.PredictedX0"/>; ends by setting
    /// <see cref="SamplerContext.Result"/>.</summary>
    protected internal abstract IEnumerable<ModelRequest> Run(SamplerContext ctx, Tensor xT, int steps);

    /// <summary>float64 array → float32 tensor (the official <c>register</c> of numpy buffers).</summary>
    /// <summary>Whether <paramref name="t"/> lives on <paramref name="device"/> (type and index; Device objects are not compared by value).</summary>
    internal static bool IsOn(Tensor t, Device device) => t.device_type == device.type && t.device_index == device.index;

    protected static Tensor F32(double[] a) => torch.tensor(a, ScalarType.Float64).to(ScalarType.Float32);
}

/// <summary>What a sampler's update rule sees: the answer to its last request, the noise source, records.</summary>
public sealed class SamplerContext
{
    internal SamplerContext(INoiseSource noise, bool record) { Noise = noise; RecordSteps = record; }

    public INoiseSource Noise { get; }
    public bool RecordSteps { get; }
    internal ModelRequest? Pending;
    internal Tensor? RawOutput;
    internal Tensor? GuidedX0;
    internal readonly List<Tensor> Persistent = new();
    internal Tensor[] KeepNext = Array.Empty<Tensor>();
    public List<Tensor> Records { get; } = new();
    public Tensor? Result { get; set; }

    /// <summary>The combined model output of the last request; when a guided x̂₀ was supplied it is the output that
    /// would have given that x̂₀ (<see cref="ModelRequest.FromX0"/>).</summary>
    public Tensor Output => GuidedX0 is null ? RawOutput! : Pending!.FromX0(GuidedX0);

    /// <summary>x̂₀ of the last request: the guided one if the caller supplied it, else the model's.</summary>
    public Tensor PredictedX0 => GuidedX0 ?? Pending!.ToX0(RawOutput!);

    /// <summary>The model's own x̂₀ of the last request (before any guidance).</summary>
    public Tensor ModelX0 => Pending!.ToX0(RawOutput!);

    /// <summary>What the guide added to x̂₀ at the last request, or null when it was left alone.</summary>
    public Tensor? GuidanceDelta => GuidedX0 is null ? null : GuidedX0 - Pending!.ToX0(RawOutput!);

    /// <summary>Whether the caller replaced x̂₀ for the last request.</summary>
    public bool Guided => GuidedX0 is not null;

    /// <summary>A standard normal like x (official <c>torch.randn_like</c>), from the run's noise source.</summary>
    public Tensor RandnLike(Tensor x) => Noise.Next(x);

    /// <summary>The device of the run (that of x_T): schedule buffers and step tensors are made there.</summary>
    public Device Device { get; internal set; } = torch.CPU;

    /// <summary>Keeps a tensor alive for the whole run (schedule buffers), on the run's <see cref="Device"/>.</summary>
    public Tensor Persist(Tensor t)
    {
        if (!Sampler.IsOn(t, Device))
        {
            var moved = t.to(Device);
            if (!ReferenceEquals(moved, t)) t.Dispose();
            t = moved;
        }
        t.DetachFromDisposeScope(); Persistent.Add(t); return t;
    }

    /// <summary>Issues a request; <paramref name="keep"/> are the tensors the update rule still needs after it (every
    /// other tensor made during the step is freed by the step's dispose scope).</summary>
    public ModelRequest Issue(ModelRequest r, params Tensor?[] keep)
    {
        KeepNext = keep.Where(k => k is not null).Select(k => k!).ToArray();
        return r;
    }

    /// <summary>Records a per-step state (copied; only when recording is on).</summary>
    public void Record(Tensor t)
    {
        if (RecordSteps) Records.Add(t.detach().clone().DetachFromDisposeScope());
    }
}

/// <summary>
/// One sampling run, advanced one network evaluation at a time:
/// <code>
/// while not run.IsDone:  out = cfg.Predict(run.Request);  run.Step(out)
/// </code>
/// Each <see cref="Step"/> runs inside its own TorchSharp dispose scope; only the tensors the update rule declared
/// (and the request) survive it. The final latent <see cref="Result"/> belongs to the caller.
/// </summary>
public sealed class SamplerRun : IDisposable
{
    readonly IEnumerator<ModelRequest> _it;
    readonly SamplerContext _ctx;
    List<Tensor> _held = new();

    public Sampler Sampler { get; }
    public int Steps { get; }
    public bool IsDone { get; private set; }
    public Tensor? Result { get; private set; }
    /// <summary>Model evaluations answered so far.</summary>
    public int Evaluations { get; private set; }
    /// <summary>The pending request (null when done).</summary>
    public ModelRequest? Request => IsDone ? null : _ctx.Pending;
    /// <summary>Recorded step states (official callback order), when started with recordSteps.</summary>
    public IReadOnlyList<Tensor> Records => _ctx.Records;

    internal SamplerRun(Sampler sampler, SamplerContext ctx, Tensor xT, int steps)
    {
        Sampler = sampler; Steps = steps; _ctx = ctx;
        ctx.Device = xT.device;
        Tensor x0;
        using (var s = torch.NewDisposeScope()) x0 = ctx.Persist(xT.detach().clone());
        _it = sampler.Run(ctx, x0, steps).GetEnumerator();
        Advance();
    }

    /// <summary>Answers the pending request with the combined model output, optionally with a guided x̂₀ that replaces
    /// the model's prediction in the update (every sampler consumes x̂₀ as documented on its class).</summary>
    public void Step(Tensor output, Tensor? guidedX0 = null)
    {
        if (IsDone) throw new InvalidOperationException("the run is finished");
        using var scope = torch.NewDisposeScope();
        _ctx.RawOutput = output.detach();
        _ctx.GuidedX0 = guidedX0?.detach();
        Evaluations++;
        Advance();
    }

    void Advance()
    {
        using var scope = torch.NewDisposeScope();
        if (_it.MoveNext())
        {
            var r = _it.Current;
            _ctx.Pending = r;
            var keep = _ctx.KeepNext.Append(r.X).Append(r.T).Distinct(ReferenceEqualityComparer.Instance).Cast<Tensor>().ToList();
            foreach (var t in keep)
                if (!_held.Any(h => ReferenceEquals(h, t))) t.DetachFromDisposeScope();
            foreach (var h in _held)
                if (!keep.Any(t => ReferenceEquals(h, t)) && !_ctx.Persistent.Any(p => ReferenceEquals(p, h))) h.Dispose();
            _held = keep;
        }
        else
        {
            IsDone = true;
            Result = _ctx.Result!.DetachFromDisposeScope();
            foreach (var h in _held) if (!ReferenceEquals(h, Result) && !_ctx.Persistent.Any(p => ReferenceEquals(p, h))) h.Dispose();
            _held.Clear();
            foreach (var p in _ctx.Persistent) if (!ReferenceEquals(p, Result)) p.Dispose();
            _ctx.Persistent.Clear();
            _ctx.Pending = null;
        }
        _ctx.RawOutput = null; _ctx.GuidedX0 = null;
    }

    public void Dispose()
    {
        _it.Dispose();
        foreach (var h in _held) if (!_ctx.Persistent.Any(p => ReferenceEquals(p, h))) h.Dispose();
        foreach (var p in _ctx.Persistent) if (!ReferenceEquals(p, Result)) p.Dispose();
        _held.Clear(); _ctx.Persistent.Clear();
        foreach (var r in _ctx.Records) r.Dispose();
        _ctx.Records.Clear();
    }
}

/// <summary>
/// Resolves the official <c>sampler_type</c> strings: "spaced", "ddim", "dpm++_m2" (any "dpm[++]_[s|m][1-3]" spec
/// of dpms_sampler.py; only multistep is implemented), and "edm_" + a k-diffusion solver name.
/// </summary>
public static class Samplers
{
    public static readonly string[] Edm =
        { "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "lms", "dpm++_2s_a", "dpm++_sde", "dpm++_2m", "dpm++_2m_sde", "dpm++_3m_sde" };

    /// <summary>Every name <see cref="Create"/> accepts.</summary>
    public static IEnumerable<string> Names =>
        new[] { "spaced", "ddim", "dpm_m1", "dpm_m2", "dpm++_m1", "dpm++_m2" }.Concat(Edm.Select(e => "edm_" + e));

    public static Sampler Create(string samplerType, NoiseSchedule schedule, SamplerOptions? options = null)
    {
        options ??= new SamplerOptions();
        if (samplerType == "spaced") return new SpacedSampler(schedule, options);
        if (samplerType == "ddim") return new DdimSampler(schedule, options);
        if (samplerType.StartsWith("edm_", StringComparison.Ordinal))
        {
            var solver = samplerType["edm_".Length..];
            return solver switch
            {
                "euler" => new EdmEuler(schedule, options),
                "euler_a" => new EdmEulerAncestral(schedule, options),
                "heun" => new EdmHeun(schedule, options),
                "dpm_2" => new EdmDpm2(schedule, options),
                "dpm_2_a" => new EdmDpm2Ancestral(schedule, options),
                "lms" => new EdmLms(schedule, options),
                "dpm++_2s_a" => new EdmDpmpp2SAncestral(schedule, options),
                "dpm++_sde" => new EdmDpmppSde(schedule, options),
                "dpm++_2m" => new EdmDpmpp2M(schedule, options),
                "dpm++_2m_sde" => new EdmDpmpp2MSde(schedule, options),
                "dpm++_3m_sde" => new EdmDpmpp3MSde(schedule, options),
                _ => throw new ArgumentException($"unknown EDM solver '{solver}' in sampler type '{samplerType}'; known: {string.Join(", ", Edm)}"),
            };
        }
        if (samplerType.StartsWith("dpm", StringComparison.Ordinal))
            return new DpmSolverSampler(schedule, options, samplerType);
        throw new ArgumentException($"unknown sampler type '{samplerType}'; known: {string.Join(", ", Names)}");
    }
}
