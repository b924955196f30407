using DiffBIR.Lab.Sampling;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Sweeps;

/// <summary>
/// What one sampler step looked like: the state z_t the step started from, x̂₀ as the network predicted it and after
/// restoration guidance, the guidance loss and gradient norm (null outside the guidance window), the mean |Δx̂₀| that
/// guidance made, and — when the recorder decodes — both x̂₀ as images in [0, 1]. Tensors are copies on the CPU that
/// the record owns (dispose the recorder, or the record).
/// </summary>
public sealed record RecordedStep(int Step, int Timestep, Tensor Zt, Tensor ModelX0, Tensor GuidedX0, bool GuidanceApplied,
    double? GuidanceLoss, double? GradientNorm, double MeanAbsDeltaX0, Tensor? ModelImage, Tensor? GuidedImage) : IDisposable
{
    public void Dispose()
    {
        Zt.Dispose(); ModelX0.Dispose(); GuidedX0.Dispose(); ModelImage?.Dispose(); GuidedImage?.Dispose();
    }
}

/// <summary>
/// The per-step recorder: pass <see cref="Observer"/> as a pipeline's step observer (<c>preset.Sample(condition,
/// options, stepObserver = recorder.Observer)</c>, <c>SampleStep.Run</c>, …) and read <see cref="Steps"/> afterwards.
/// Each step's tensors are detached, copied to the CPU and moved out of the step's dispose scope, so they outlive the
/// run. <see cref="Decode"/> also decodes x̂₀ before and after guidance (two VAE decodes a step: costly at full size);
/// <see cref="Every"/> keeps every n-th step (and always the last).
/// </summary>
public sealed class StepRecorder : IDisposable
{
    readonly List<RecordedStep> _steps = new();

    /// <summary>Decode x̂₀ (before and after guidance) to images for every kept step.</summary>
    public bool Decode { get; init; }
    /// <summary>Keep every n-th step (1: all); the last step of a run is always kept when <see cref="TotalSteps"/> is given.</summary>
    public int Every { get; init; } = 1;
    /// <summary>The run's number of steps (to keep the last one whatever <see cref="Every"/>); optional.</summary>
    public int? TotalSteps { get; init; }
    /// <summary>Called after each kept step (e.g. to print progress); optional.</summary>
    public Action<RecordedStep>? OnStep { get; init; }

    public IReadOnlyList<RecordedStep> Steps => _steps;

    /// <summary>The step observer: records and lets the run continue.</summary>
    public Func<StepInfo, bool> Observer => Record;

    bool Record(StepInfo info)
    {
        if (Every < 1) throw new InvalidOperationException($"StepRecorder.Every must be ≥ 1 (got {Every})");
        bool last = TotalSteps is { } n && info.Step == n - 1;
        if (info.Step % Every != 0 && !last) return true;
        using var _ = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        var model = (info.ModelX0 ?? info.PredictedX0).detach();
        var guided = info.PredictedX0.detach();
        double delta = (guided - model).abs().mean().item<float>();
        Tensor? modelImage = null, guidedImage = null;
        if (Decode)
        {
            modelImage = ToImage(info.Decoder is null ? throw new InvalidOperationException("the sampling loop was given no decoder: record with Decode = false") : info.Decoder(model));
            guidedImage = info.GuidanceApplied ? ToImage(info.Decoder(guided)) : modelImage.clone();
        }
        var step = new RecordedStep(info.Step, info.Timestep, Keep(info.Zt), Keep(model), Keep(guided), info.GuidanceApplied,
            info.GuidanceLoss, info.GradientNorm, delta, modelImage is null ? null : Keep(modelImage), guidedImage is null ? null : Keep(guidedImage));
        _steps.Add(step);
        OnStep?.Invoke(step);
        return true;
    }

    static Tensor ToImage(Tensor decoded) => ((decoded + 1) / 2).clamp(0, 1);

    static Tensor Keep(Tensor t)
    {
        var c = t.detach().to(torch.CPU).clone();
        c.DetachFromDisposeScope();
        return c;
    }

    /// <summary>Forgets the recorded steps (disposing their tensors), e.g. before the next run.</summary>
    public void Clear()
    {
        foreach (var s in _steps) s.Dispose();
        _steps.Clear();
    }

    public void Dispose() => Clear();
}
