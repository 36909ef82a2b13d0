//! A scale set's instances in a compact binary columnar encoding, for snapshots: one column per field
//! (small integers as LEB128 varints, instance ids as deltas, zones and sizes as indexes into tables
//! carried alongside), so that an instance costs a few bytes and a general-purpose compressor shrinks
//! the runs further. Decoding gives the same [`InstanceInput`]s an import takes, so a restore goes
//! through the engine's own validation.

use crate::engine::{Engine, InstanceInput};
use crate::error::{codes, CoreError, Result};
use crate::model::{Health, PowerState, Priority, ProvisioningState};

/// The encoding's first bytes; a change of layout gets a new one.
const MAGIC: &[u8; 4] = b"SSC1";
const PROTECT_FROM_SCALE_IN: u8 = 1;
const PROTECT_FROM_SCALE_SET_ACTIONS: u8 = 2;
const NAMED: u8 = 4;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_text(out: &mut Vec<u8>, text: &str) {
    put_varint(out, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
}

fn index_of<T: PartialEq>(all: &[T], value: &T) -> u8 {
    all.iter().position(|v| v == value).unwrap_or(0) as u8
}

/// The instances of scale set `name`, encoded. What the encoding holds is exactly what
/// [`decode_instances`] gives back; the spec and the next instance id are saved beside it.
pub fn encode_instances(engine: &Engine, name: &str) -> Result<Vec<u8>> {
    let state = engine.scale_set(name)?;
    let instances = &state.instances;
    let n = instances.len();
    let zones = &engine.region().zones;
    // One pass over the instances (each is several times larger than its encoding), into one buffer
    // per column, then the columns one after the other.
    let mut ids = Vec::with_capacity(n);
    let mut zone = Vec::with_capacity(n);
    let mut fault_domain = Vec::with_capacity(n);
    let mut size = Vec::with_capacity(n);
    let mut states = [
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    ];
    let mut model_version = Vec::with_capacity(n);
    let mut flags = Vec::with_capacity(n);
    // The sizes this set's instances use, numbered in order of first use.
    let mut local = vec![u32::MAX; engine.sizes().len()];
    let mut used: Vec<&str> = Vec::new();
    let mut previous = 0;
    for i in instances {
        let slot = &mut local[usize::from(i.vm_size)];
        if *slot == u32::MAX {
            *slot = used.len() as u32;
            used.push(&engine.sizes()[usize::from(i.vm_size)]);
        }
        put_varint(&mut ids, i.instance_id - previous);
        previous = i.instance_id;
        put_varint(&mut zone, i.zone.map_or(0, |z| u64::from(z) + 1));
        put_varint(&mut fault_domain, u64::from(i.fault_domain));
        put_varint(&mut size, u64::from(*slot));
        states[0].push(index_of(Priority::ALL, &i.priority));
        states[1].push(index_of(PowerState::ALL, &i.power_state));
        states[2].push(index_of(Health::ALL, &i.health));
        states[3].push(index_of(ProvisioningState::ALL, &i.provisioning_state));
        put_varint(&mut model_version, i.model_version);
        let mut f = 0;
        if i.protect_from_scale_in {
            f |= PROTECT_FROM_SCALE_IN;
        }
        if i.protect_from_scale_set_actions {
            f |= PROTECT_FROM_SCALE_SET_ACTIONS;
        }
        if i.name.is_some() {
            f |= NAMED;
        }
        flags.push(f);
    }
    let mut out =
        Vec::with_capacity(64 + ids.len() + zone.len() + fault_domain.len() + size.len() + 6 * n);
    out.extend_from_slice(MAGIC);
    put_varint(&mut out, n as u64);
    put_varint(&mut out, used.len() as u64);
    for size in &used {
        put_text(&mut out, size);
    }
    put_varint(&mut out, zones.len() as u64);
    for zone in zones {
        put_text(&mut out, zone);
    }
    for column in [&ids, &zone, &fault_domain, &size] {
        out.extend_from_slice(column);
    }
    for column in &states {
        out.extend_from_slice(column);
    }
    out.extend_from_slice(&model_version);
    out.extend_from_slice(&flags);
    for name in instances.iter().filter_map(|i| i.name.as_deref()) {
        put_text(&mut out, name);
    }
    Ok(out)
}

fn damaged(what: &str) -> CoreError {
    CoreError::invalid(
        codes::INVALID_PARAMETER,
        format!("the encoded instances are damaged ({what})."),
    )
    .at("instances")
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.data.get(self.at).ok_or_else(|| damaged("truncated"))?;
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(damaged("a number is too long"))
    }

    fn count(&mut self, what: &str) -> Result<usize> {
        let n = self.varint()?;
        // Every counted item takes at least one byte, so a count beyond what is left is damage.
        if n > (self.data.len() - self.at) as u64 {
            return Err(damaged(what));
        }
        Ok(n as usize)
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| damaged("truncated"))?;
        let slice = &self.data[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn text(&mut self) -> Result<String> {
        let n = self.count("a text's length")?;
        String::from_utf8(self.bytes(n)?.to_vec()).map_err(|_| damaged("a text is not UTF-8"))
    }

    fn texts(&mut self) -> Result<Vec<String>> {
        let n = self.count("a table's length")?;
        (0..n).map(|_| self.text()).collect()
    }

    fn pick<T: Copy>(all: &[T], byte: u8, what: &str) -> Result<T> {
        all.get(usize::from(byte))
            .copied()
            .ok_or_else(|| damaged(what))
    }
}

/// The instances [`encode_instances`] encoded.
pub fn decode_instances(data: &[u8]) -> Result<Vec<InstanceInput>> {
    if data.get(..4) != Some(MAGIC.as_slice()) {
        return Err(damaged("not an encoding this version knows"));
    }
    let mut r = Reader { data, at: 4 };
    let n = r.count("the number of instances")?;
    let sizes = r.texts()?;
    let zones = r.texts()?;
    let mut out: Vec<InstanceInput> = Vec::with_capacity(n);
    let mut id = 0u64;
    for _ in 0..n {
        id = id
            .checked_add(r.varint()?)
            .ok_or_else(|| damaged("an instance id"))?;
        out.push(InstanceInput {
            instance_id: id,
            name: None,
            zone: None,
            fault_domain: 0,
            vm_size: String::new(),
            priority: Priority::Regular,
            power_state: PowerState::ALL[0],
            health: Health::ALL[0],
            provisioning_state: ProvisioningState::ALL[0],
            model_version: None,
            protect_from_scale_in: false,
            protect_from_scale_set_actions: false,
        });
    }
    for i in out.iter_mut() {
        let zone = r.varint()?;
        if zone > 0 {
            let label = usize::try_from(zone - 1)
                .ok()
                .and_then(|z| zones.get(z))
                .ok_or_else(|| damaged("a zone"))?;
            i.zone = Some(label.clone());
        }
    }
    for i in out.iter_mut() {
        i.fault_domain = u32::try_from(r.varint()?).map_err(|_| damaged("a fault domain"))?;
    }
    for i in out.iter_mut() {
        let size = usize::try_from(r.varint()?).ok();
        i.vm_size = size
            .and_then(|s| sizes.get(s))
            .ok_or_else(|| damaged("a VM size"))?
            .clone();
    }
    let columns = r.bytes(4 * n)?;
    for (k, i) in out.iter_mut().enumerate() {
        i.priority = Reader::pick(Priority::ALL, columns[k], "a priority")?;
        i.power_state = Reader::pick(PowerState::ALL, columns[n + k], "a power state")?;
        i.health = Reader::pick(Health::ALL, columns[2 * n + k], "a health")?;
        i.provisioning_state = Reader::pick(
            ProvisioningState::ALL,
            columns[3 * n + k],
            "a provisioning state",
        )?;
    }
    for i in out.iter_mut() {
        i.model_version = Some(r.varint()?);
    }
    let flags = r.bytes(n)?;
    for (i, &f) in out.iter_mut().zip(flags) {
        i.protect_from_scale_in = f & PROTECT_FROM_SCALE_IN != 0;
        i.protect_from_scale_set_actions = f & PROTECT_FROM_SCALE_SET_ACTIONS != 0;
        if f & NAMED != 0 {
            i.name = Some(r.text()?);
        }
    }
    if r.at != data.len() {
        return Err(damaged("bytes left over"));
    }
    Ok(out)
}
