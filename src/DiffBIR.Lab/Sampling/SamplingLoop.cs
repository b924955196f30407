using DiffBIR.Lab.Guidance;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Sampling;

/// <summary>
/// What an observer sees after each sampler step's main model evaluation: the step, the model timestep t, z_t, x̂₀
/// (after guidance where it was applied), the guidance loss and the norm of its latent gradient Δ.
/// </summary>
/// <remarks>The loop runs each step in a TorchSharp DisposeScope: these tensors, and any an observer makes, are freed
/// when the step ends. Call <c>DetachFromDisposeScope()</c> on a tensor to keep it past the step.</remarks>
public sealed record StepInfo(int Step, int Timestep, Tensor Zt, Tensor PredictedX0, bool GuidanceApplied, double? GuidanceLoss, double? GradientNorm)
{
    /// <summary>The combined (CFG) model output of the step (ε for the spaced sampler).</summary>
    public Tensor? Output { get; init; }
    /// <summary>x̂₀ as the network predicted it, before guidance.</summary>
    public Tensor? ModelX0 { get; init; }
    /// <summary>The guidance scale the guide used at this step, s·f(t) (null where guidance did not act).</summary>
    public double? GuidanceScale { get; init; }
    /// <summary>Latent → image, when the loop was given one (see <see cref="DecodePredictedX0"/>).</summary>
    public Func<Tensor, Tensor>? Decoder { get; init; }

    /// <summary>x̂₀ decoded to an image (costs one VAE decode; only on request). Needs a decoder given to the loop.</summary>
    public Tensor DecodePredictedX0()
    {
        if (Decoder is null) throw new InvalidOperationException("no decoder was given to the sampling loop: pass one to decode x̂₀ for the observer");
        using var _ = torch.no_grad();
        return Decoder(PredictedX0);
    }
}

/// <summary>
/// The sampling loop of the library (the pipeline's, the sweeps', the fixtures'), made of the stages a notebook uses
/// itself (<see cref="Stages.SampleStep"/>): for each step the CFG model output and x̂₀ (Predict), optional guidance of
/// x̂₀ (the first evaluation of each step only), the observer, then the sampler update (Step). Every step runs in its
/// own dispose scope. The observer returns false to cancel: <see cref="Run"/> then returns null.
/// </summary>
public static class SamplingLoop
{
    /// <summary>
    /// Runs <paramref name="state"/> to the end. <paramref name="decoder"/> lets the observer decode x̂₀ on request
    /// (<see cref="StepInfo.DecodePredictedX0"/>). Returns the sampled latent z₀ (owned by the caller), or null when the
    /// observer cancelled; the run stays undisposed — dispose <paramref name="state"/> when done with it.
    /// </summary>
    public static Tensor? Run(Stages.SampleStep stepper, Stages.SamplingState state, Guide? guide = null,
                              Func<StepInfo, bool>? observer = null, Func<Tensor, Tensor>? decoder = null)
    {
        while (!state.IsDone)
        {
            using var scope = torch.NewDisposeScope();
            var p = stepper.Predict(state);
            var g = guide is null ? null : Stages.GuideExtensions.Apply(guide, p);
            var guided = g is { Applied: true } ? g.X0 : null;
            if (observer is not null && !observer(Stages.SampleStep.StepInfoOf(p, g, decoder))) return null;
            state = stepper.Step(state, p, guided);
        }
        return state.Latent;
    }
}
