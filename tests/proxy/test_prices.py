"""Prices of hosted models from litellm's bundled list, for onboarding's spend estimate and cap."""
from __future__ import annotations


import pytest

from proxy import prices


def test_a_hosted_model_is_priced_from_litellm_s_list_without_importing_litellm():
    import sys

    prices.price_list.cache_clear()
    had = "litellm" in sys.modules
    assert prices.listed_prices("openai/gpt-4o", "openai", None) == pytest.approx((2.5, 10.0))
    assert prices.listed_prices("gpt-4o-mini", "openai", None) == pytest.approx((0.15, 0.6))
    assert ("litellm" in sys.modules) == had  # seconds of import saved: the file is read as it is


def test_self_hosted_and_unlisted_models_are_not_priced():
    # a server of one's own, whatever its model is called, is not the provider's price
    assert prices.listed_prices("openai/gpt-4o", "openai", "http://127.0.0.1:8000/v1") is None
    assert prices.listed_prices("hosted_vllm/meta-llama/Llama-3.1-8B-Instruct", "hosted_vllm", None) is None
    assert prices.listed_prices("openai/no-such-model-here", "openai", None) is None


def test_a_bare_name_listed_under_another_provider_is_not_its_price(monkeypatch, tmp_path):
    table = {"shared-name": {"litellm_provider": "groq", "input_cost_per_token": 1e-6,
                             "output_cost_per_token": 2e-6},
             "together_ai/shared-name": {"litellm_provider": "together_ai", "input_cost_per_token": 3e-6,
                                         "output_cost_per_token": 4e-6}}
    monkeypatch.setattr(prices, "price_list", lambda: table)
    assert prices.listed_prices("groq/shared-name", "groq", None) == pytest.approx((1.0, 2.0))
    assert prices.listed_prices("together_ai/shared-name", "together_ai", None) == pytest.approx((3.0, 4.0))
    assert prices.listed_prices("openai/shared-name", "openai", None) is None


def test_an_unreadable_list_prices_nothing(monkeypatch, tmp_path):
    (tmp_path / prices.PRICE_LIST).write_text("{not json")
    spec = type("Spec", (), {"submodule_search_locations": [str(tmp_path)]})()
    monkeypatch.setattr("importlib.util.find_spec", lambda name: spec)
    prices.price_list.cache_clear()
    try:
        assert prices.price_list() == {}
        assert prices.listed_prices("openai/gpt-4o", "openai", None) is None
    finally:
        prices.price_list.cache_clear()


def test_onboarding_prices_a_hosted_model_providers_yaml_leaves_unpriced(tmp_path):
    """The spend cap's estimate: a gpt-4o added without prices is not taken for free."""
    import yaml

    from proxy.onboarding_service import prices_of
    from proxy.providers import ProviderRegistry

    def entry(name, model, **info):
        params = {"model": model, "api_key": "sk-test-0123456789"}
        if info.pop("api_base", None):
            params["api_base"] = "http://127.0.0.1:9/v1"
        return {"model_name": name, "litellm_params": params, "model_info": info}

    path = tmp_path / "providers.yaml"
    path.write_text(yaml.safe_dump({"model_list": [
        entry("hosted", "openai/gpt-4o"),
        entry("priced", "openai/gpt-4o", input_price_per_mtok=1.0, output_price_per_mtok=2.0),
        entry("mine", "openai/gpt-4o", api_base=True)]}))
    models = ProviderRegistry(path, dict).snapshot.models
    got = {name: prices_of(d) for name, d in models.items()}
    assert (got["hosted"].input_per_mtok, got["hosted"].output_per_mtok) == pytest.approx((2.5, 10.0))
    assert (got["priced"].input_per_mtok, got["priced"].output_per_mtok) == (1.0, 2.0)
    assert (got["mine"].input_per_mtok, got["mine"].output_per_mtok) == (None, None)


def test_a_litellm_model_list_s_own_prices_are_read(tmp_path):
    """A LiteLLM model_list prices a deployment with its own keys (USD per token, in model_info or
    litellm_params). They were ignored: an Azure or OpenRouter deployment (an api_base of its own,
    so not in litellm's list) priced so was onboarded as free, past any spend cap."""
    import yaml

    from proxy.onboarding_service import prices_of
    from proxy.providers import ProviderRegistry

    base = {"model": "azure/gpt-4o", "api_base": "https://example.openai.azure.com", "api_key": "sk-test-0123456789"}
    path = tmp_path / "providers.yaml"
    path.write_text(yaml.safe_dump({"model_list": [
        {"model_name": "info", "litellm_params": base,
         "model_info": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": "1e-05"}},
        {"model_name": "params", "litellm_params": {**base, "input_cost_per_token": 5e-07}},
        {"model_name": "ours", "litellm_params": base,  # ours win over LiteLLM's
         "model_info": {"input_price_per_mtok": 1.0, "output_price_per_mtok": 2.0,
                        "input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05}},
        {"model_name": "junk", "litellm_params": base,
         "model_info": {"input_cost_per_token": "free", "output_cost_per_token": -1}}]}))
    got = {name: (p.input_per_mtok, p.output_per_mtok)
           for name, p in ((n, prices_of(d)) for n, d in ProviderRegistry(path, dict).snapshot.models.items())}
    assert got["info"] == pytest.approx((2.5, 10.0))
    assert got["params"][0] == pytest.approx(0.5) and got["params"][1] is None
    assert got["ours"] == (1.0, 2.0)
    assert got["junk"] == (None, None)


def test_a_side_left_unpriced_is_taken_from_the_next_source_or_said_free(tmp_path, caplog):
    """A gpt-4o priced for its input only counted its output as free ($0.53 for the whole test
    where $4.53 is due): each side comes from the first source that gives it, and one that none
    gives, beside a priced one, is said once to be counted free."""
    import yaml

    from proxy.onboarding_service import prices_of
    from proxy.providers import ProviderRegistry

    key = "sk-test-0123456789"
    azure = {"model": "azure/gpt-4o", "api_base": "https://example.openai.azure.com", "api_key": key}
    path = tmp_path / "providers.yaml"
    path.write_text(yaml.safe_dump({"model_list": [
        {"model_name": "ours_in", "litellm_params": {"model": "openai/gpt-4o", "api_key": key},
         "model_info": {"input_price_per_mtok": 3.0}},
        {"model_name": "litellm_in", "litellm_params": {"model": "openai/gpt-4o", "api_key": key,
                                                        "input_cost_per_token": 2e-06}},
        {"model_name": "mixed", "litellm_params": {**azure, "input_cost_per_token": 5e-07},
         "model_info": {"output_price_per_mtok": 4.0}},
        {"model_name": "azure_in", "litellm_params": azure, "model_info": {"input_price_per_mtok": 1.0}}]}))
    models = ProviderRegistry(path, dict).snapshot.models
    with caplog.at_level("WARNING", logger="satroute.onboarding"):
        got = {name: (p.input_per_mtok, p.output_per_mtok)
               for name, p in ((n, prices_of(d)) for n, d in models.items())}
        prices_of(models["azure_in"])  # every sync reads them again: said once
    assert got["ours_in"] == pytest.approx((3.0, 10.0))  # the output from litellm's list
    assert got["litellm_in"] == pytest.approx((2.0, 10.0))
    assert got["mixed"] == pytest.approx((0.5, 4.0))
    assert got["azure_in"] == (1.0, None)  # an api_base of its own: not in the list
    said = [r.getMessage() for r in caplog.records if "as free" in r.getMessage()]
    assert said == ["onboarding azure_in: providers.yaml prices its input tokens only, and litellm's "
                    "price list does not know it: onboarding counts its output tokens as free (set "
                    "model_info.output_price_per_mtok)"]
