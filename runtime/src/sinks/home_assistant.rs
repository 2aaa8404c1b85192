//! Home Assistant MQTT discovery for an MQTT sink's results.
//!
//! For each new result topic (one per key, since the topic is filled from
//! the key's fields) the sink publishes, before the first result, one
//! retained config per listed field on
//! `<prefix>/sensor/<unique id>/config`. Home Assistant then shows each
//! field as a sensor: `state_topic` is the result topic, `value_template`
//! reads the field, the key's fields form one device, and the pipeline's
//! status topic says whether it is available.
//!
//! The sink also listens on `<prefix>/status` (Home Assistant's birth
//! message: `online` after it starts) and on the config topics: when Home
//! Assistant restarts, or a config is purged (an empty retained message),
//! the configs are published again.

use crate::mqtt::topic::Piece;
use serde_json::{json, Map, Value};

/// Sensor device classes Home Assistant knows (its `SensorDeviceClass`).
pub const DEVICE_CLASSES: &[&str] = &[
    "absolute_humidity",
    "apparent_power",
    "aqi",
    "area",
    "atmospheric_pressure",
    "battery",
    "blood_glucose_concentration",
    "carbon_dioxide",
    "carbon_monoxide",
    "conductivity",
    "current",
    "data_rate",
    "data_size",
    "date",
    "distance",
    "duration",
    "energy",
    "energy_distance",
    "energy_storage",
    "enum",
    "frequency",
    "gas",
    "humidity",
    "illuminance",
    "irradiance",
    "moisture",
    "monetary",
    "nitrogen_dioxide",
    "nitrogen_monoxide",
    "nitrous_oxide",
    "ozone",
    "ph",
    "pm1",
    "pm10",
    "pm25",
    "power",
    "power_factor",
    "precipitation",
    "precipitation_intensity",
    "pressure",
    "reactive_energy",
    "reactive_power",
    "signal_strength",
    "sound_pressure",
    "speed",
    "sulphur_dioxide",
    "temperature",
    "timestamp",
    "volatile_organic_compounds",
    "volatile_organic_compounds_parts",
    "voltage",
    "volume",
    "volume_flow_rate",
    "volume_storage",
    "water",
    "weight",
    "wind_direction",
    "wind_speed",
];

/// Home Assistant's sensor state classes.
pub const STATE_CLASSES: &[&str] = &[
    "measurement",
    "measurement_angle",
    "total",
    "total_increasing",
];

/// One result field announced as a sensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldSpec {
    pub field: String,
    /// The entity's name (default: the field's name).
    pub name: Option<String>,
    pub unit: Option<String>,
    pub device_class: Option<String>,
    pub state_class: Option<String>,
    pub icon: Option<String>,
}

/// A sink's `home_assistant:` block, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discovery {
    /// `homeassistant` unless set.
    pub prefix: String,
    /// The device name, with `{field}` from the result (default: the
    /// result topic).
    pub name: Option<String>,
    pub fields: Vec<FieldSpec>,
    /// The pipeline's status topic, when it is on this sink's broker.
    pub availability: Option<String>,
    pub pipeline: String,
    pub qos: u8,
}

impl Discovery {
    /// Home Assistant's birth and last-will topic.
    pub fn birth_topic(&self) -> String {
        format!("{}/status", self.prefix)
    }

    /// Where every sensor config lives (to notice purges).
    pub fn config_filter(&self) -> String {
        format!("{}/sensor/+/config", self.prefix)
    }

    /// The fields the device name is filled from.
    pub fn name_fields(&self) -> Vec<String> {
        self.name.as_deref().map(placeholders).unwrap_or_default()
    }

    /// The retained configs (topic, payload) that announce the results
    /// published on `state_topic`; `get` reads the result's fields.
    pub fn configs<'a>(
        &self,
        state_topic: &str,
        get: impl Fn(&str) -> Piece<'a>,
    ) -> Vec<(String, Vec<u8>)> {
        let device_id = format!(
            "rivulet_{}_{}_{:08x}",
            slug(&self.pipeline),
            slug(state_topic),
            xxhash_rust::xxh3::xxh3_64(state_topic.as_bytes()) as u32
        );
        let device_name = match &self.name {
            Some(t) => fill(t, &get),
            None => state_topic.to_string(),
        };
        let device = json!({
            "identifiers": [device_id],
            "name": device_name,
            "manufacturer": "rivulet",
            "model": format!("pipeline {}", self.pipeline),
            "sw_version": env!("CARGO_PKG_VERSION"),
        });
        self.fields
            .iter()
            .map(|f| {
                let unique_id = format!("{device_id}_{}", slug(&f.field));
                let mut c = Map::new();
                c.insert(
                    "name".into(),
                    Value::String(f.name.clone().unwrap_or_else(|| f.field.clone())),
                );
                c.insert("unique_id".into(), Value::String(unique_id.clone()));
                c.insert("object_id".into(), Value::String(unique_id.clone()));
                c.insert("state_topic".into(), Value::String(state_topic.into()));
                c.insert(
                    "value_template".into(),
                    Value::String(format!(
                        "{{{{ value_json[{}] }}}}",
                        Value::String(f.field.clone())
                    )),
                );
                c.insert("qos".into(), Value::from(self.qos));
                let opt = [
                    ("unit_of_measurement", &f.unit),
                    ("device_class", &f.device_class),
                    ("state_class", &f.state_class),
                    ("icon", &f.icon),
                ];
                for (k, v) in opt {
                    if let Some(v) = v {
                        c.insert(k.into(), Value::String(v.clone()));
                    }
                }
                if let Some(a) = &self.availability {
                    c.insert("availability_topic".into(), Value::String(a.clone()));
                    c.insert("payload_available".into(), "online".into());
                    c.insert("payload_not_available".into(), "offline".into());
                }
                c.insert("device".into(), device.clone());
                c.insert(
                    "origin".into(),
                    json!({"name": "rivulet", "sw_version": env!("CARGO_PKG_VERSION")}),
                );
                let topic = format!("{}/sensor/{unique_id}/config", self.prefix);
                (topic, Value::Object(c).to_string().into_bytes())
            })
            .collect()
    }
}

/// `{name}` placeholders of a text template.
pub fn placeholders(t: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        out.push(rest[open + 1..open + close].to_string());
        rest = &rest[open + close + 1..];
    }
    out
}

/// Fills `{field}` placeholders (a missing field: `?`).
fn fill<'a>(t: &str, get: &impl Fn(&str) -> Piece<'a>) -> String {
    let mut out = String::new();
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        out.push_str(&rest[..open]);
        match get(&rest[open + 1..open + close]) {
            Piece::Str(s) => out.push_str(s),
            Piece::Other(s) => out.push_str(&s),
            Piece::Missing => out.push('?'),
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    out
}

/// Lower-case letters, digits and `_`: what an object id may hold.
fn slug(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    while out.contains("__") {
        out = out.replace("__", "_");
    }
    out.trim_matches('_').to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn discovery() -> Discovery {
        Discovery {
            prefix: "homeassistant".into(),
            name: Some("{sensor_id} average".into()),
            fields: vec![
                FieldSpec {
                    field: "avg_celsius".into(),
                    name: None,
                    unit: Some("°C".into()),
                    device_class: Some("temperature".into()),
                    state_class: Some("measurement".into()),
                    icon: None,
                },
                FieldSpec {
                    field: "readings".into(),
                    name: Some("Readings".into()),
                    unit: None,
                    device_class: None,
                    state_class: None,
                    icon: None,
                },
            ],
            availability: Some("rivulet/avg/status".into()),
            pipeline: "sensor-averages".into(),
            qos: 1,
        }
    }

    /// Home Assistant's MQTT sensor schema, as documented
    /// (https://www.home-assistant.io/integrations/sensor.mqtt/ and
    /// /integrations/mqtt/#discovery-messages): the keys a config may have
    /// and the JSON type of each. `state_topic` is required; a `device`
    /// needs `unique_id` and at least one identifier or connection.
    fn check_against_the_schema(c: &Value) {
        let strings = [
            "name",
            "unique_id",
            "object_id",
            "state_topic",
            "value_template",
            "unit_of_measurement",
            "device_class",
            "state_class",
            "icon",
            "availability_topic",
            "payload_available",
            "payload_not_available",
        ];
        let obj = c.as_object().unwrap();
        for (k, v) in obj {
            match k.as_str() {
                k if strings.contains(&k) => assert!(v.is_string(), "{k} is a string: {v}"),
                "qos" => assert!(matches!(v.as_u64(), Some(0..=2)), "qos: {v}"),
                "device" => {
                    let d = v.as_object().unwrap();
                    for (dk, dv) in d {
                        match dk.as_str() {
                            "identifiers" => {
                                let ids = dv.as_array().unwrap();
                                assert!(!ids.is_empty());
                                assert!(ids.iter().all(Value::is_string));
                            }
                            "name" | "manufacturer" | "model" | "sw_version" => {
                                assert!(dv.is_string(), "device.{dk}")
                            }
                            other => panic!("device.{other} is not in the schema"),
                        }
                    }
                }
                "origin" => {
                    let o = v.as_object().unwrap();
                    assert!(o["name"].is_string(), "origin needs a name");
                    assert!(o
                        .keys()
                        .all(|k| ["name", "sw_version", "support_url"].contains(&k.as_str())));
                }
                other => panic!("`{other}` is not an MQTT sensor option"),
            }
        }
        assert!(obj["state_topic"].is_string(), "state_topic is required");
        assert!(obj.contains_key("unique_id"), "a device needs unique_id");
        let id = obj["unique_id"].as_str().unwrap();
        assert!(
            id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{id}"
        );
        if let Some(dc) = obj.get("device_class").and_then(Value::as_str) {
            assert!(DEVICE_CLASSES.contains(&dc));
        }
        if let Some(sc) = obj.get("state_class").and_then(Value::as_str) {
            assert!(STATE_CLASSES.contains(&sc));
        }
    }

    #[test]
    fn configs_follow_home_assistants_schema_field_by_field() {
        let d = discovery();
        let get = |f: &str| match f {
            "sensor_id" => Piece::Str("s/7"),
            _ => Piece::Missing,
        };
        let configs = d.configs("averages/s_7", get);
        assert_eq!(configs.len(), 2);
        let parsed: Vec<(String, Value)> = configs
            .iter()
            .map(|(t, p)| (t.clone(), serde_json::from_slice(p).unwrap()))
            .collect();
        for (topic, c) in &parsed {
            check_against_the_schema(c);
            let id = c["unique_id"].as_str().unwrap();
            assert_eq!(topic, &format!("homeassistant/sensor/{id}/config"));
            assert_eq!(c["state_topic"], "averages/s_7");
            assert_eq!(c["availability_topic"], "rivulet/avg/status");
            assert_eq!(c["device"]["name"], "s/7 average");
        }
        let (a, r) = (&parsed[0].1, &parsed[1].1);
        assert_eq!(a["value_template"], "{{ value_json[\"avg_celsius\"] }}");
        assert_eq!(a["unit_of_measurement"], "°C");
        assert_eq!(a["device_class"], "temperature");
        assert_eq!(a["name"], "avg_celsius");
        assert_eq!(r["name"], "Readings");
        assert!(r.get("unit_of_measurement").is_none());
        // One device for the key's fields; ids stable and distinct.
        assert_eq!(a["device"]["identifiers"], r["device"]["identifiers"]);
        assert_ne!(a["unique_id"], r["unique_id"]);
        assert_eq!(d.configs("averages/s_7", get), configs, "stable");
        let other = d.configs("averages/s/7", get);
        assert_ne!(other[0].0, configs[0].0, "topics that slug alike differ");
    }

    #[test]
    fn names_fill_from_fields_and_slugs_are_object_ids() {
        assert_eq!(placeholders("{a} and {b.c}"), vec!["a", "b.c"]);
        let get = |f: &str| match f {
            "a" => Piece::Other("1".into()),
            _ => Piece::Missing,
        };
        assert_eq!(fill("x {a} {b} y", &get), "x 1 ? y");
        assert_eq!(slug("Averages/S 7/°C"), "averages_s_7_c");
    }
}
